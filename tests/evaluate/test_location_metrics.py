"""The detection and segmentation figures on hand-computed cases: box IoU, mask IoU, accuracy at IoU 0.5 / 0.75
with objects matched by label, invalid answers, and the majority box of the training scenes."""

import numpy as np
import pytest
import torch

from polymodal.data.locations import LocatedObject, Locations, format_locations, format_object, parse_locations
from polymodal.data.synthetic import World
from polymodal.evaluate.locations import Majority, box_iou, figures, is_invalid, mask_iou, match, summary

SIZE = (100, 100)


@pytest.mark.parametrize("a, b, iou", [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
    ((0, 0, 10, 10), (5, 5, 15, 15), 25 / 175),  # a 5x5 overlap of two 10x10 boxes
    ((0, 0, 10, 10), (0, 0, 5, 10), 0.5),  # one half of the other
    ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edges: x2 is exclusive
    ((0, 0, 4, 4), (2, 2, 6, 10), 4 / (16 + 32 - 4)),
])
def test_box_iou(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou)
    assert box_iou(b, a) == pytest.approx(iou)


def test_mask_iou():
    a, b = torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)
    a[:2] = True  # 8 pixels
    b[1:3] = True  # 8 pixels, 4 shared
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(b & ~b, a & ~a) == 0.0  # both empty


def obj(label, box, mask=None):
    return LocatedObject(label, box, mask)


def test_objects_are_matched_by_label_and_counted_at_each_threshold():
    truths = [[obj("red circle", (0, 0, 10, 10)), obj("blue square", (50, 50, 70, 70))],
              [obj("red circle", (20, 20, 40, 40))]]
    answers = [Locations([obj("blue square", (50, 50, 70, 70)),  # IoU 1, listed first: matched by label
                          obj("red circle", (0, 0, 10, 8))], 0),  # IoU 0.8
               Locations([obj("green circle", (20, 20, 40, 40))], 0)]  # the wrong label: a miss
    f = figures(answers, truths)
    assert f.objects == 3
    assert f.box_accuracy == pytest.approx((2 / 3, 2 / 3))
    answers[0] = Locations([obj("blue square", (50, 50, 70, 70)), obj("red circle", (0, 0, 10, 7))], 0)  # IoU 0.7
    assert figures(answers, truths).box_accuracy == pytest.approx((2 / 3, 1 / 3))
    assert f.mask_iou is None and f.invalid == 0


def test_each_object_asked_for_gets_the_iou_of_the_answer_s_object_matched_to_it():
    """Hand-made answers whose IoUs are known: a box identical to its reference scores 1, a disjoint one 0, one
    overlapping half of its reference (and as much outside) 1/3; a label the answer does not give scores 0."""
    truths = [[obj("cat", (0, 0, 10, 10)), obj("dog", (20, 20, 30, 30)), obj("cat", (40, 0, 50, 10))],
              [obj("cow", (0, 0, 10, 10))]]
    answers = [Locations([obj("cat", (0, 0, 10, 10)), obj("dog", (60, 60, 70, 70)), obj("cat", (45, 0, 55, 10))], 0),
               Locations([obj("hen", (0, 0, 10, 10))], 0)]
    first, second = (match(a, t) for a, t in zip(answers, truths))
    assert first.box_iou == pytest.approx((1.0, 0.0, 50 / 150)) and second.box_iou == (0.0,)
    assert first.mask_iou is None and not first.invalid and not second.invalid
    f = summary([first, second])
    assert f.objects == 4 and f.box_accuracy == pytest.approx((1 / 4, 1 / 4)) and f.mask_iou is None
    assert f == figures(answers, truths)
    # matched in the answer's order, not by overlap: the two cats listed the other way round both miss
    swapped = Locations([answers[0].objects[2], answers[0].objects[1], answers[0].objects[0]], 0)
    assert match(swapped, truths[0]).box_iou == (0.0, 0.0, 0.0)


def test_masks_are_scored_where_the_references_have_them():
    full = torch.ones(4, 4, dtype=torch.bool)
    quarter = torch.zeros(4, 4, dtype=torch.bool)
    quarter[:2, :2] = True
    with_masks = match(Locations([obj("a", (0, 0, 4, 4), quarter)], 0), [obj("a", (0, 0, 4, 4), full)])
    without = match(Locations([obj("a", (0, 0, 4, 4))], 0), [obj("a", (0, 0, 4, 4))])
    assert with_masks.mask_iou == (0.25,) and without.mask_iou is None and not without.invalid
    f = summary([with_masks, without])
    assert f.mask_iou == 0.25 and f.box_accuracy == (1.0, 1.0)  # the mean over the objects that have masks


def test_mean_mask_iou_counts_a_missing_mask_as_zero():
    full = torch.ones(4, 4, dtype=torch.bool)
    half = full.clone()
    half[2:] = False
    truths = [[obj("a", (0, 0, 4, 4), full), obj("b", (0, 0, 4, 4), full)]]
    f = figures([Locations([obj("a", (0, 0, 4, 4), half), obj("b", (0, 0, 4, 4))], 0)], truths)
    assert f.mask_iou == pytest.approx((0.5 + 0.0) / 2)
    assert f.invalid == 1  # a segment answer with an object without its mask


def test_invalid_answers_are_unparseable_or_have_the_wrong_number_of_tokens():
    good = format_locations([format_object((10, 10, 50, 50), SIZE, "red circle"),
                             format_object((60, 60, 90, 90), SIZE, "blue square")])
    assert not is_invalid(parse_locations(good, SIZE), masks=False)
    three = "<loc0100><loc0100><loc0500> red circle"  # three location tokens
    assert is_invalid(parse_locations(three, SIZE), masks=False)
    assert is_invalid(parse_locations(good + " ; " + three, SIZE), masks=False)
    assert is_invalid(parse_locations("red circle", SIZE), masks=False)
    assert is_invalid(parse_locations("", SIZE), masks=False)  # names no object
    assert is_invalid(parse_locations(good, SIZE), masks=True)  # no segmentation tokens


def test_the_majority_box_is_each_label_s_mean_training_box():
    world = World(seed=0)
    majority = Majority.of_world(world, "detect", n_train=50)
    boxes = [box for i in range(50) for label, box in world.sample("detect", i).document.segments[-1].boxes
             if label == "red circle"]
    assert boxes
    side = world.image_size
    assert majority.answer(["red circle"], (side, side)).objects[0].box == pytest.approx(tuple(np.mean(boxes, axis=0)))
    # in an image of other sides, the same shares of them
    [wide] = majority.answer(["red circle"], (side, 2 * side)).objects
    assert wide.box == pytest.approx(tuple(np.mean(boxes, axis=0) * [2, 1, 2, 1]))
    answer = majority.answer(["red circle", "blue square"], (32, 32))
    assert [o.label for o in answer.objects] == ["red circle", "blue square"] and answer.malformed == 0
    assert all(o.mask is None for o in answer.objects)  # detect scenes have no masks to average


def test_the_majority_mask_is_the_label_s_mean_shape_in_its_box():
    world = World(seed=0)
    majority = Majority.of_world(world, "segment", n_train=80)
    [square, circle] = majority.answer(["red square", "red circle"], (32, 32)).objects
    x1, y1, x2, y2 = (round(v) for v in square.box)
    assert square.mask.sum() > 0.8 * (x2 - x1) * (y2 - y1)  # a square fills its box
    assert 0.6 < circle.mask.sum() / ((circle.box[2] - circle.box[0]) * (circle.box[3] - circle.box[1])) < 0.95
