"""The built-in world's eval split is held out: no eval document and no eval medium (by content hash)
occurs in training, for every task, and the held-out combinations are visible in the pixels and samples
themselves, not only in the generator's bookkeeping. The one medium both splits share is say_and_draw's
drawn answer: one of 12 canonical pictures (`World.draw`), a closed set of answers like the words "red
circle"; its question's image is held out as every other."""

import hashlib
from collections import Counter

import numpy as np
import pytest

from polymodal.data import synthetic
from polymodal.data.synthetic import (
    CELLS, COLOURS, DIRECTIONS, HELD_OUT_BACKGROUND, HELD_OUT_CELL, HELD_OUT_DIRECTION, HELD_OUT_SIZE, OBJECTS, SHAPES,
    LOCATION_TASKS, SIZES, TASKS, TINTS, World, asked_directly, describe)
from polymodal.evaluate_cot import VALIDATION_START

WORLD = World(seed=0)
N_TRAIN, N_EVAL = 2000, 300


def media_bytes(segment) -> bytes:
    if segment.kind == "image":
        return segment.media.tobytes()
    if segment.kind == "video":
        return b"".join(frame.tobytes() for frame in segment.media)
    return segment.media.waveform.tobytes()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


CANONICAL = {digest(WORLD.draw(c, s).tobytes()) for c in COLOURS for s in SHAPES}


def hashes(task: str, split: str, n: int, start: int = 0, direct: bool = False) -> tuple[set[str], set[str], set[str]]:
    """Content hashes of the documents start..start+n-1 of a split (every text and medium), of their media, and
    of the drawn answers among them (target images of say_and_draw); direct: the chain-of-thought examples
    asked directly."""
    docs, media, drawn = set(), set(), set()
    for i in range(start, start + n):
        example = WORLD.sample(task, i, split)
        parts = []
        for s in (asked_directly(example) if direct else example).document.segments:
            masks = b"".join(m.tobytes() for m in s.masks or [])  # a segment answer's objects' pixels
            parts.append(digest(s.text.encode() + masks if s.kind == "text" else media_bytes(s)))
            if s.kind != "text":
                (drawn if task == "say_and_draw" and s.target else media).add(parts[-1])
        docs.add(digest("|".join(parts).encode()))
    return docs, media, drawn


@pytest.mark.parametrize("task", TASKS)
def test_no_eval_document_or_medium_occurs_in_training(task):
    train_docs, train_media, _ = hashes(task, "train", N_TRAIN)
    eval_docs, eval_media, eval_drawn = hashes(task, "eval", N_EVAL)
    assert len(eval_media) == N_EVAL  # every eval example brings its own medium
    assert not eval_docs & train_docs
    assert not eval_media & train_media
    assert eval_drawn <= CANONICAL  # drawn answers: only the 12 canonical pictures


def test_chain_of_thought_validation_split_is_held_out_and_apart_from_the_test_split():
    """`polymodal eval` picks the routing threshold on eval examples VALIDATION_START on and tests on 0..n-1:
    neither split's images nor documents (chain-of-thought or asked directly) occur in training of either
    form, nor in the other split."""
    train = [hashes(task, "train", N_TRAIN) for task in ("compare", "compare_cot")]
    train_docs, train_media = set.union(*(d for d, _, _ in train)), set.union(*(m for _, m, _ in train))
    test = [hashes("compare_cot", "eval", N_EVAL, direct=d) for d in (False, True)]
    validation = [hashes("compare_cot", "eval", N_EVAL, VALIDATION_START, direct=d) for d in (False, True)]
    for (test_docs, test_media, _), (val_docs, val_media, _) in zip(test, validation):
        assert len(test_media) == len(val_media) == N_EVAL
        assert not (test_docs | val_docs) & train_docs and not (test_media | val_media) & train_media
        assert not test_docs & val_docs and not test_media & val_media


def test_text_to_image_eval_prompts_and_drawn_pairs_never_occur_in_training():
    def seen(split, n):
        examples = [WORLD.sample("text_to_image", i, split) for i in range(n)]
        for ex in examples:  # the target shows what the prompt asks, in the cell it names
            assert describe(ex.document.images[0]) == ex.answer
        return Counter(ex.document.texts[0] for ex in examples)

    train, held_out = seen("train", N_TRAIN), seen("eval", N_EVAL)
    assert len(train) == len(OBJECTS) * (len(CELLS) - 1)  # every other (object, cell) pair is trained
    assert len(held_out) == len(OBJECTS) and not set(held_out) & set(train)


def test_eval_shapes_stand_where_training_never_puts_them():
    """(object, cell) pairs read from the pixels of single-shape images: disjoint between the splits,
    while every object and every cell alone appears in training (the shape question's training shapes are
    grey: `test_no_rendered_training_shape_shows_an_object_held_out`)."""
    def pairs(split, n):
        return {describe(WORLD.sample(task, i, split).document.images[0])
                for task in ("caption", "colour", "say_and_draw") for i in range(n)}

    train, held_out = pairs("train", 400), pairs("eval", 200)
    assert not train & held_out and None not in train | held_out
    assert {p.split(" in the ")[0] for p in train} == {f"a {o}" for o in OBJECTS}
    assert {p.split(" in the ")[1] for p in train} == set(CELLS)


def test_eval_videos_and_clips_are_drawn_from_held_out_ranges():
    def video(split, i):
        ex = WORLD.sample("video_direction", i, split)
        frames = [np.asarray(f).max(-1) >= 128 for f in ex.document.videos[0]]
        ys, xs = np.nonzero(frames[0])
        ye, xe = np.nonzero(frames[-1])
        distance = max(abs(ye.min() - ys.min()), abs(xe.min() - xs.min()))
        first = np.asarray(ex.document.videos[0][0])[frames[0]]
        grey = (first == first[:, :1]).all()  # half of training's videos move a grey shape, which is no object
        colour_shape = "grey" if grey else describe(ex.document.videos[0][0]).split(" in the ")[0]
        return colour_shape, ex.answer, int(distance)

    train = [video("train", i) for i in range(400)]
    held_out = [video("eval", i) for i in range(100)]
    assert not {v[:2] for v in train} & {v[:2] for v in held_out}  # (object, direction) pairs
    assert {v[1] for v in held_out} == set(DIRECTIONS)
    assert not {v[2] for v in train} & {v[2] for v in held_out}  # distances moved: speeds

    def loudest_frequency(split, task, i):
        x = WORLD.sample(task, i, split).document.audios[0].waveform
        return np.argmax(np.abs(np.fft.rfft(x))) * WORLD.sample_rate / len(x)

    beeps = lambda split, n: [loudest_frequency(split, "audio_count", i) for i in range(n)]  # noqa: E731
    train, held_out = beeps("train", 300), beeps("eval", 100)
    lo, hi = min(held_out), max(held_out)
    # the measured peak of a short beep is within a few Hz of its frequency
    assert hi - lo > 50 and not [f for f in train if lo + 5 < f < hi - 5]


def rendered(task: str, split: str, n: int) -> list[list[dict]]:
    """What the renderer drew for examples 0..n-1 of a task, read from its drawing calls (not from the
    generator's bookkeeping): per example, per shape drawn, its object ("red circle", or "grey circle" for a
    grey shape), cell, size, background tint and, in a video, the direction it moves. say_and_draw's drawn
    answer (one of the canonical pictures, `World.draw`) is left out."""
    calls, canonical = [], []
    draw, picture = synthetic._draw, World.draw
    lo, hi = round(0.3 * WORLD.image_size), WORLD.image_size // 2 - 2
    mid, half = (lo + hi + 1) // 2, WORLD.image_size // 2

    def record(size, background, shapes, mode="RGB"):
        shapes = list(shapes)
        if mode == "RGB":  # an image the model sees (mode L: a segment answer's mask)
            calls.append((background, shapes))
        return draw(size, background, shapes, mode)

    def canonical_picture(self, colour, shape):
        canonical.append(len(calls))
        return picture(self, colour, shape)

    def describe_shape(background, shape, rgb, x, y, side):
        if len(set(rgb)) == 1:
            colour = "grey"
        else:
            [colour] = [c for c, ref in COLOURS.items() if max(abs(a - b) for a, b in zip(rgb, ref)) <= 20]
        cx, cy = x + side / 2, y + side / 2
        order = np.argsort(background)
        tint = TINTS[order[-1]] if background[order[-1]] >= background[order[-2]] + 5 else None
        return {"object": f"{colour} {shape}", "cell": CELLS[2 * (cy >= half) + (cx >= half)],
                "size": SIZES[side >= mid], "tint": tint, "at": (x, y)}

    out = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic, "_draw", record)
        mp.setattr(World, "draw", canonical_picture)
        for i in range(n):
            calls.clear(), canonical.clear()
            WORLD.sample(task, i, split)
            drawn = [[describe_shape(bg, *s) for s in shapes] for k, (bg, shapes) in enumerate(calls)
                     if k not in canonical]
            if task == "video_direction":  # one shape per frame: its first and last positions give the direction
                (x0, y0), (x1, y1) = drawn[0][0]["at"], drawn[-1][0]["at"]
                drawn = [[{**drawn[0][0], "direction": ("left" if x1 < x0 else "right") if x1 != x0
                           else ("up" if y1 < y0 else "down")}]]
            out.append([s for image in drawn for s in image])
    return out


@pytest.mark.parametrize("task", [t for t in TASKS if t not in ("audio_count", "audio_pitch")])
def test_no_rendered_training_shape_shows_an_object_held_out(task):
    """Every shape of every rendered training image and video: a coloured object never in its held-out cell,
    size or background tint, nor moving in its held-out direction; a grey shape (training's shape and count
    questions) is no object, so may stand anywhere. The same reading of eval scenes finds every object in its
    held-out cell, so the reading is live."""
    train = [s for shapes in rendered(task, "train", 300) for s in shapes]
    assert train
    for s in train:
        if s["object"].startswith("grey"):
            continue
        assert s["object"] in OBJECTS, s
        if task == "video_direction":  # videos: a random dark background and their own sizes
            assert s["direction"] != HELD_OUT_DIRECTION[s["object"]], s
            continue
        assert s["cell"] != HELD_OUT_CELL[s["object"]], s
        assert s["size"] != HELD_OUT_SIZE[s["object"]], s
        assert s["tint"] != HELD_OUT_BACKGROUND[s["object"].split()[0]], s
    held_out = [s for shapes in rendered(task, "eval", 100) for s in shapes]
    if task == "video_direction":
        assert all(s["direction"] == HELD_OUT_DIRECTION[s["object"]] for s in held_out)
    else:
        assert all(s["cell"] == HELD_OUT_CELL[s["object"]] for s in held_out)


@pytest.mark.parametrize("task", LOCATION_TASKS)
def test_located_objects_stand_in_their_held_out_cell_in_eval_and_never_in_training(task):
    """Read from the answers' boxes: an eval object's box lies in the cell its object never occupies in training."""
    half = WORLD.image_size / 2
    for split, n in (("train", 400), ("eval", 100)):
        for i in range(n):
            for label, (x1, y1, x2, y2) in WORLD.sample(task, i, split).document.segments[-1].boxes:
                assert (x2 <= half or x1 >= half) and (y2 <= half or y1 >= half)  # inside one cell
                cell = CELLS[2 * int(y1 >= half) + int(x1 >= half)]
                assert (cell == HELD_OUT_CELL[label]) == (split == "eval"), (split, i, label, cell)
