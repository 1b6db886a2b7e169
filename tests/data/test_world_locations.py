"""The world's detect and segment tasks: every asked object's box and mask are its pixels in the rendered image (the
foreground of its grid cell, its colour and shape recognisable there), objects are asked for and answered in one
order, one to three of them, and segment answers carry masks that detect answers do not."""

from collections import Counter

import numpy as np
import pytest

from polymodal.data.synthetic import CELLS, LOCATION_TASKS, World, recognise
from polymodal.data.documents import read_jsonl, write_jsonl

WORLD = World(seed=0)
N = 60


def cell_of(box, size):
    x1, y1, x2, y2 = box
    return CELLS[2 * int((y1 + y2) / 2 >= size / 2) + int((x1 + x2) / 2 >= size / 2)]


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("task", LOCATION_TASKS)
def test_each_object_s_box_and_mask_are_its_pixels_in_the_image(task, split):
    size = WORLD.image_size
    for i in range(N):
        image, prompt, objects = WORLD.sample(task, i, split).document.segments
        px = np.asarray(image.media, dtype=np.float32)
        foreground = px.max(axis=-1) >= 128
        for k, (label, box) in enumerate(objects.boxes):
            x1, y1, x2, y2 = (int(v) for v in box)
            half = size // 2
            cell = CELLS.index(cell_of(box, size))
            region = np.zeros_like(foreground)
            region[(cell // 2) * half:(cell // 2 + 1) * half, (cell % 2) * half:(cell % 2 + 1) * half] = True
            shape = foreground & region  # the one shape in its cell
            ys, xs = np.nonzero(shape)
            assert (x1, y1, x2, y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert recognise(np.where(shape[..., None], px, 0)) == tuple(label.split())
            if task == "segment":
                assert np.array_equal(np.asarray(objects.masks[k]) > 127, shape)
        if task == "detect":
            assert objects.masks is None


@pytest.mark.parametrize("task", LOCATION_TASKS)
def test_one_to_three_objects_are_asked_for_and_answered_in_the_prompt_s_order(task):
    counts = Counter()
    for i in range(N):
        example = WORLD.sample(task, i)
        _, prompt, objects = example.document.segments
        labels = [label for label, _ in objects.boxes]
        assert prompt.text == f"{task} " + " ; ".join(labels)
        assert example.answer == objects.text and objects.target
        assert len(set(labels)) == len(labels)
        counts[len(labels)] += 1
    assert set(counts) == {1, 2, 3}, counts


def test_a_mix_of_tasks_draws_location_tasks_only_when_named():
    assert not {e.task for e in WORLD.examples("train", n=200)} & set(LOCATION_TASKS)
    assert {e.task for e in WORLD.examples("train", LOCATION_TASKS, n=20)} == set(LOCATION_TASKS)
    assert "detect red circle" in WORLD.texts(["detect"]) and "detect red circle" not in WORLD.texts()


def test_segment_and_detect_documents_round_trip_through_jsonl_masks_included(tmp_path):
    docs = [WORLD.sample(task, i).document for task in LOCATION_TASKS for i in range(3)]
    write_jsonl(docs, tmp_path / "out.jsonl")
    back = read_jsonl(tmp_path / "out.jsonl")
    pixels = lambda images: [np.asarray(im).tolist() for im in images or []]  # noqa: E731 (PIL's == compares classes)
    assert [[(s.text, s.boxes, pixels(s.masks)) for s in d.segments] for d in back] == \
        [[(s.text, s.boxes, pixels(s.masks)) for s in d.segments] for d in docs]
    assert [pixels(d.images) for d in back] == [pixels(d.images) for d in docs]
    assert sum(s.masks is not None for d in back for s in d.segments) == 3  # the segment documents'
