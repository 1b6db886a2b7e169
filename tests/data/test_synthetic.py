import itertools

import numpy as np
import pytest

from polymodal.data.documents import read_jsonl
from polymodal.data.synthetic import (CELLS, COLOURS, COUNTS, DIRECTIONS, MIXED_TASKS, NUMBERS, OBJECTS, TASKS,
                                      Example, World, asked_directly, describe, export_jsonl, final_answer, recognise)

IMAGE_TASKS = ("caption", "colour", "shape", "count", "position")
WORLD = World(seed=0)
PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)


def fingerprint(ex: Example) -> bytes:
    """Every byte of an example: its texts and all its media."""
    parts = []
    for s in ex.document.segments:
        if s.kind == "text":
            parts.append(s.text.encode())
        elif s.kind == "image":
            parts.append(s.media.tobytes())
        elif s.kind == "video":
            parts.extend(frame.tobytes() for frame in s.media)
        else:
            parts.append(s.media.waveform.tobytes())
    return b"|".join(parts)


def foreground(image) -> np.ndarray:
    px = np.asarray(image)
    return px.max(axis=-1) >= 128


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an (N, 2) array of (y, x)."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, pixels = [start], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for dy, dx in itertools.product((-1, 0, 1), repeat=2):
                q = (y + dy, x + dx)
                if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
        found.append(np.array(pixels))
    return found


def nearest_colour(rgb: np.ndarray) -> str:
    """Palette name of each pixel, by its own nearest palette entry (not via recognise)."""
    names = np.array(list(COLOURS))
    return names[((rgb[:, None, :].astype(np.float32) - PALETTE) ** 2).sum(-1).argmin(-1)]


# -- determinism and splits -----------------------------------------------------------------------

def test_same_seed_gives_identical_examples():
    other = World(seed=0)
    for task in TASKS:
        for i in range(3):
            assert fingerprint(WORLD.sample(task, i)) == fingerprint(other.sample(task, i))


@pytest.mark.parametrize("task", TASKS)
def test_seed_and_split_change_the_data(task):
    for i in range(5):
        a = fingerprint(WORLD.sample(task, i))
        assert a != fingerprint(World(seed=1).sample(task, i))
        assert a != fingerprint(WORLD.sample(task, i, split="eval"))
        assert a != fingerprint(WORLD.sample(task, i + 1))


# -- answers agree with what is drawn or played ---------------------------------------------------

def test_count_answer_is_the_number_of_separate_shapes():
    seen = set()
    for i in range(300):
        ex = WORLD.sample("count", i)
        image = np.asarray(ex.document.images[0])
        blobs = components(foreground(image))
        assert NUMBERS[len(blobs) - 1] == ex.answer
        seen.add(ex.answer)
        for blob in blobs:  # each blob is one flat palette colour, not a blend
            assert len(set(nearest_colour(image[blob[:, 0], blob[:, 1]]))) == 1
    assert seen == set(NUMBERS)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_comparison_chain_counts_the_colours_drawn(split):
    """"are there more red than blue shapes? count first" -> "two and one, so yes": the counts are those of
    the pixels' shapes of each colour; asked directly, the same image gets the chain's final answer."""
    seen = set()
    for i in range(200):
        ex = WORLD.sample("compare_cot", i, split)
        image = np.asarray(ex.document.images[0])
        colours = [nearest_colour(image[b[:, 0], b[:, 1]])[0] for b in components(foreground(image))]
        a, b = ex.document.texts[0].removeprefix("are there more ").split(" shapes?")[0].split(" than ")
        counts, answer = ex.answer.split(", so ")
        assert counts == f"{COUNTS[colours.count(a)]} and {COUNTS[colours.count(b)]}"
        assert answer == ("yes" if colours.count(a) > colours.count(b) else "no") == final_answer(ex.answer)
        direct = asked_directly(ex)
        assert direct.task == "compare" and direct.answer == answer and direct.document.texts[-1] == answer
        assert direct.document.texts[0] == f"are there more {a} than {b} shapes?"
        assert direct.document.images[0] is ex.document.images[0]
        seen.add((colours.count(a) > 0 and colours.count(b) > 0, answer))
    assert seen == {(True, "yes"), (True, "no"), (False, "yes"), (False, "no")}


def test_final_answer_reads_only_a_finished_chain():
    assert final_answer("one and two, so no") == "no"
    for text in ("yes", "one and two", "one and two, so", "one and two, so maybe", ", so yes"):
        assert final_answer(text) is None


def test_colour_answer_matches_the_pixels():
    for i in range(300):
        ex = WORLD.sample("colour", i)
        image = np.asarray(ex.document.images[0])
        names = set(nearest_colour(image[foreground(image)]))
        assert names == {ex.answer}
        assert image[~foreground(image)].max() <= 40  # the background is dark


def test_position_answer_is_the_cell_of_the_named_shape():
    for i in range(300):
        ex = WORLD.sample("position", i)
        image = np.asarray(ex.document.images[0])
        obj = ex.document.texts[0].removeprefix("where is the ").removesuffix("?")
        assert obj in OBJECTS
        matches = []
        for blob in components(foreground(image)):
            only = np.zeros_like(image)
            only[blob[:, 0], blob[:, 1]] = image[blob[:, 0], blob[:, 1]]
            if " ".join(recognise(only)) == obj:
                y, x = blob.mean(axis=0)
                half = image.shape[0] / 2
                matches.append(CELLS[2 * (y >= half) + (x >= half)])
        assert matches == [ex.answer]


@pytest.mark.parametrize("task", ["caption", "shape", "colour"])
def test_recogniser_agrees_with_single_shape_answers(task):
    n = 1000 if task == "caption" else 300
    right = 0
    for i in range(n):
        ex = WORLD.sample(task, i)
        colour, shape = recognise(ex.document.images[0])
        right += ex.answer in (f"a {colour} {shape}", colour, shape)
    assert right / n >= 0.99


def test_recogniser_sees_nothing_in_a_blank_image():
    assert recognise(np.zeros((32, 32, 3), np.uint8)) is None


def test_video_direction_matches_centroid_movement():
    seen = set()
    for i in range(200):
        ex = WORLD.sample("video_direction", i)
        [frames] = ex.document.videos
        assert len(frames) == WORLD.video_frames
        centroids = []
        for frame in frames:
            [blob] = components(foreground(frame))
            centroids.append(blob.mean(axis=0))
        (dy, dx) = centroids[-1] - centroids[0]
        moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert moved == ex.answer
        assert max(abs(dx), abs(dy)) >= 4 and min(abs(dx), abs(dy)) == 0
        steps = np.diff(np.array(centroids), axis=0)
        assert (np.sign(steps) == np.sign(steps[-1])).all()  # it keeps going the same way
        seen.add(ex.answer)
    assert seen == set(DIRECTIONS)


def bursts(x: np.ndarray, sample_rate: int) -> list[tuple[int, int]]:
    """(start, end) sample ranges where 10 ms frames carry energy."""
    hop = sample_rate // 100
    rms = np.sqrt((x[: len(x) // hop * hop].reshape(-1, hop) ** 2).mean(axis=1))
    loud = np.concatenate([[False], rms > 0.05, [False]])
    edges = np.flatnonzero(np.diff(loud.astype(int)))
    return [(a * hop, b * hop) for a, b in zip(edges[::2], edges[1::2])]


def check_clip(ex: Example) -> np.ndarray:
    [audio] = ex.document.audios
    assert audio.sample_rate == WORLD.sample_rate
    assert audio.waveform.dtype == np.float32 and audio.waveform.shape == (WORLD.sample_rate,)
    assert np.abs(audio.waveform).max() <= 1
    return audio.waveform


def test_audio_count_answer_is_the_number_of_bursts():
    seen = set()
    for i in range(200):
        ex = WORLD.sample("audio_count", i)
        assert NUMBERS[len(bursts(check_clip(ex), WORLD.sample_rate)) - 1] == ex.answer
        seen.add(ex.answer)
    assert seen == set(NUMBERS)


def test_audio_pitch_answer_matches_zero_crossing_frequency():
    seen = set()
    for i in range(200):
        ex = WORLD.sample("audio_pitch", i)
        x = check_clip(ex)
        [(a, b)] = bursts(x, WORLD.sample_rate)
        a, b = a + 320, b - 320  # 20 ms in from each edge, where noise alone can cross zero
        quarter = (b - a) // 4

        def freq(seg: np.ndarray) -> float:
            return np.count_nonzero(np.diff(np.signbit(seg))) / 2 / (len(seg) / WORLD.sample_rate)

        start, end = freq(x[a:a + quarter]), freq(x[b - quarter:b])
        assert ("rising" if end > start else "falling") == ex.answer
        assert max(start, end) / min(start, end) > 1.2
        seen.add(ex.answer)
    assert seen == {"rising", "falling"}


def test_text_to_image_draws_what_the_prompt_asks():
    sides, drawn = set(), set()
    for split in ("train", "eval"):
        for i in range(200):
            ex = WORLD.sample("text_to_image", i, split)
            prompt, image = ex.document.segments[0].text, ex.document.images[0]
            assert prompt == "draw " + ex.answer
            assert describe(image) == ex.answer  # the object, in the cell the prompt names
            [blob] = components(foreground(image))
            sides.add(int(np.ptp(blob[:, 1])) + 1)
            drawn.add(image.tobytes())
    assert len(drawn) == 400 and len(sides) >= 4  # no two targets alike: sizes, places and tints vary


# -- API ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", MIXED_TASKS)  # location answers: tests/data/test_world_locations.py
def test_answers_come_from_the_choices_and_cover_them(task):
    choices = WORLD.choices(task)
    assert WORLD.chance(task) == pytest.approx(1 / len(choices))
    vocabulary = set(WORLD.texts())
    answers = set()
    for split, n in (("train", 300), ("eval", 100)):  # text_to_image draws some pairs in eval only
        for i in range(n):
            ex = WORLD.sample(task, i, split)
            assert ex.task == task and ex.choices == choices and ex.answer in choices
            assert set(ex.document.texts) <= vocabulary
            answers.add(ex.answer)
    assert answers == set(choices)


def test_documents_put_the_loss_on_the_answer_only():
    ex = WORLD.sample("colour", 0)
    assert [s.kind for s in ex.document.segments] == ["image", "text", "text"]
    assert ex.document.target_mask == [False, False, True]
    assert ex.document.texts == ["what colour is the shape?", ex.answer]
    assert ex.document.id == "train/colour/0"


def test_examples_is_a_deterministic_shuffled_mix():
    stream = list(WORLD.examples("train", n=200))
    assert len(stream) == 200
    assert [fingerprint(e) for e in stream] == [fingerprint(e) for e in WORLD.examples("train", n=200)]
    tasks = [e.task for e in stream]
    assert set(tasks) == set(MIXED_TASKS)
    assert tasks != sorted(tasks, key=TASKS.index)
    for task in MIXED_TASKS:  # each task's examples are its samples 0, 1, 2, ... in order
        mine = [fingerprint(e) for e in stream if e.task == task]
        assert mine == [fingerprint(WORLD.sample(task, k)) for k in range(len(mine))]
    only = list(WORLD.examples("eval", tasks="count", n=5))
    assert [fingerprint(e) for e in only] == [fingerprint(WORLD.sample("count", k, "eval")) for k in range(5)]
    endless = WORLD.examples("train", tasks=["shape", "colour"])
    assert {next(endless).task for _ in range(50)} == {"shape", "colour"}


def test_bad_arguments_are_errors_that_say_what_is_valid():
    with pytest.raises(ValueError, match="unknown task 'colours'.*caption, colour, shape"):
        WORLD.sample("colours", 0)
    with pytest.raises(ValueError, match="unknown task"):
        WORLD.examples("train", tasks=["colour", "smell"])
    with pytest.raises(ValueError, match="unknown split 'test'.*train, eval"):
        WORLD.sample("colour", 0, split="test")
    with pytest.raises(ValueError, match="index"):
        WORLD.sample("colour", -1)
    with pytest.raises(ValueError, match="image_size"):
        World(image_size=8)
    with pytest.raises(ValueError, match="video_frames"):
        World(video_frames=1)
    with pytest.raises(ValueError, match="colour"):
        WORLD.draw("purple", "circle")


def test_texts_cover_every_prompt_and_answer():
    texts = WORLD.texts()
    assert texts == sorted(set(texts))
    assert {"caption", "how many beeps?", "where is the red circle?", "draw a yellow triangle in the top left", "top left",
            "rising", "three"} <= set(texts)


def test_other_sizes_scale_the_world():
    world = World(seed=3, image_size=64, video_frames=6, audio_seconds=0.5)
    assert world.sample("count", 0).document.images[0].size == (64, 64)
    assert len(world.sample("video_direction", 0).document.videos[0]) == 6
    assert world.sample("audio_count", 0).document.audios[0].waveform.shape == (8000,)
    for i in range(100):
        ex = world.sample("caption", i)
        assert "a " + " ".join(recognise(ex.document.images[0])) == ex.answer
        ex = world.sample("count", i)
        assert NUMBERS[len(components(foreground(ex.document.images[0]))) - 1] == ex.answer
        ex = world.sample("audio_count", i)
        assert NUMBERS[len(bursts(ex.document.audios[0].waveform, world.sample_rate)) - 1] == ex.answer


def test_export_jsonl_round_trips(tmp_path):
    path = tmp_path / "world.jsonl"
    examples = export_jsonl(WORLD, path, split="eval", n=60)
    assert {e.task for e in examples} == set(MIXED_TASKS)
    back = read_jsonl(path)
    assert len(back) == 60
    for ex, doc in zip(examples, back):
        ours = ex.document
        assert doc.id == ours.id
        assert [(s.kind, s.text, s.target) for s in doc.segments] == [(s.kind, s.text, s.target)
                                                                      for s in ours.segments]
        for a, b in zip(ours.segments, doc.segments):
            if a.kind == "image":
                assert np.array_equal(np.asarray(a.media), np.asarray(b.media))
            elif a.kind == "video":
                assert [f.tobytes() for f in a.media] == [f.tobytes() for f in b.media]
            elif a.kind == "audio":
                assert b.media.sample_rate == a.media.sample_rate
                np.testing.assert_allclose(b.media.waveform, a.media.waveform, rtol=0, atol=1 / 32767)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
