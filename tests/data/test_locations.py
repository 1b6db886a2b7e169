"""Location and segmentation answers: box bins round-trip, masks survive crop -> 64x64 -> paste, answers
written by `format_object` parse back, and every part that is not one object is counted as malformed."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import polymodal as pm
from polymodal.data.locations import (LOC_TOKENS, SEG_TOKENS, bins_to_box, box_to_bins, crop_mask, encode_mask,
                                      format_locations, format_object, parse_locations, paste_mask)
from polymodal.encoders.mask_vae import MaskVAE, MaskVAEConfig

SIZE = (48, 80)  # (height, width): not square, so x and y cannot be swapped unseen


def test_every_bin_round_trips():
    for h, w in (SIZE, (224, 224), (7, 1000)):
        for b in range(1024):
            bins = [b, (b + 3) % 1024, min(b + 1, 1023), 1023]
            box = bins_to_box(bins, (h, w))
            if box[0] < box[2] and box[1] < box[3]:
                assert box_to_bins(box, (h, w)) == bins


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1))
def test_box_round_trip_is_within_half_a_bin(a, b, c, d):
    h, w = SIZE
    x1, x2 = sorted((a * w, c * w))
    y1, y2 = sorted((b * h, d * h))
    if x2 - x1 < 1e-6 or y2 - y1 < 1e-6:
        return
    bins = box_to_bins((x1, y1, x2, y2), SIZE)
    assert all(0 <= v <= 1023 for v in bins)
    back = bins_to_box(bins, SIZE)
    for got, want, side in zip(back, (x1, y1, x2, y2), (w, h, w, h)):
        assert abs(got - want) <= 0.5 / 1023 * side + 1e-9


def test_bins_are_y_first_and_rounded_as_big_vision():
    """[y1, x1, y2, x2], each round(b * 1023): on a 1023 x 2046 image a y pixel is a bin, an x pixel half one."""
    h, w = 1023, 2046
    assert box_to_bins((0, 2.6, 2046, 1023), (h, w)) == [3, 0, 1023, 1023]
    assert box_to_bins((7.4, 3.4, 9.2, 5), (h, w)) == [3, 4, 5, 5]  # x: 3.7 and 4.6 bins


def ellipse(h, w, box):
    x1, y1, x2, y2 = box
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1


def iou(a, b):
    return float((a & b).sum()) / float((a | b).sum())


def test_a_sliver_at_the_edge_still_crops():
    mask = torch.ones(SIZE, dtype=torch.bool)
    assert torch.equal(crop_mask(mask, (79.7, 47.6, 80, 48)), torch.ones(64, 64))


@pytest.mark.parametrize("box", [(10, 6, 70, 40), (0, 0, 80, 48), (33, 20, 41, 29)])
def test_mask_survives_crop_and_paste(box):
    mask = ellipse(*SIZE, box)
    crop = crop_mask(mask, box)
    assert crop.shape == (64, 64) and 0 <= crop.min() and crop.max() <= 1
    back = paste_mask(2 * (crop - 0.5), box, SIZE)  # logits as the VQ-VAE's decoder gives them: > 0 inside
    assert back.shape == SIZE and back.dtype == torch.bool
    assert iou(back, mask) > 0.85
    x1, y1, x2, y2 = box
    outside = torch.ones(SIZE, dtype=torch.bool)
    outside[y1:y2, x1:x2] = False
    assert not back[outside].any()


def test_detection_answer_round_trips():
    boxes = [(10.0, 6.0, 70.0, 40.0), (0.0, 0.0, 80.0, 48.0), (33.3, 20.1, 41.7, 29.9)]
    labels = ["red circle", "the whole image", "x"]
    text = format_locations([format_object(b, SIZE, label) for b, label in zip(boxes, labels)])
    assert text.count(" ; ") == 2 and text.startswith(LOC_TOKENS[box_to_bins(boxes[0], SIZE)[0]])
    got = pm.parse_locations(text, SIZE)
    assert got.malformed == 0
    assert [o.label for o in got.objects] == labels
    for obj, box in zip(got.objects, boxes):
        assert obj.mask is None
        assert all(abs(a - b) <= 0.5 / 1023 * 80 + 1e-9 for a, b in zip(obj.box, box))
        assert box_to_bins(obj.box, SIZE) == box_to_bins(box, SIZE)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return MaskVAE(MaskVAEConfig(hidden_dim=4, codebook_dim=8, codebook_size=128)).eval()


def test_segmentation_answer_round_trips(vae):
    box = (10, 6, 70, 40)
    codes = encode_mask(ellipse(*SIZE, box), box, vae)
    assert len(codes) == 16 and all(0 <= c < 128 for c in codes)
    text = format_object(box, SIZE, "red circle", codes) + " ; " + format_object((0, 0, 8, 8), SIZE, "dot")
    assert "".join(SEG_TOKENS[c] for c in codes) in text
    got = parse_locations(text, SIZE, vae)
    assert got.malformed == 0 and [o.label for o in got.objects] == ["red circle", "dot"]
    mask, none = got.objects[0].mask, got.objects[1].mask
    assert none is None and mask.shape == SIZE and mask.dtype == torch.bool
    with torch.no_grad():
        expected = paste_mask(vae.decode(torch.tensor([codes]))[0], got.objects[0].box, SIZE)
    assert torch.equal(mask, expected)
    inside = torch.zeros(SIZE, dtype=torch.bool)
    inside[6:40, 10:70] = True
    assert not mask[~inside].any()


def test_segmentation_tokens_without_a_vae_are_a_clear_error(vae):
    text = format_object((10, 6, 70, 40), SIZE, "a", [5] * 16)
    with pytest.raises(pm.InputError, match="segmentation tokens: pass vae="):
        parse_locations(text, SIZE)


def test_boxes_only_keeps_the_boxes_and_codes_and_decodes_no_mask(vae):
    codes = list(range(20, 36))
    text = format_object((10, 6, 70, 40), SIZE, "red circle", codes) + " ; " + format_object((0, 0, 8, 8), SIZE, "dot")
    partial = "".join(LOC_TOKENS[i] for i in (100, 200, 300, 400)) + "".join(SEG_TOKENS[:8]) + " half a mask"
    for given in (None, vae):  # with or without a VAE: no mask is decoded
        got = parse_locations(text + " ; " + partial, SIZE, given, boxes_only=True)
        assert [(o.label, o.mask, o.codes) for o in got.objects] == [("red circle", None, tuple(codes)),
                                                                     ("dot", None, ())]
        assert [o.box for o in got.objects] == [o.box for o in parse_locations(text, SIZE, vae).objects]
        assert got.malformed == 1  # a partial mask is no object, as big_vision counts it
    assert parse_locations(text, SIZE, vae).objects[0].codes == tuple(codes)


def test_a_mask_past_the_vae_s_codebook_keeps_its_box_and_counts_as_malformed():
    """Codes a mask VQ-VAE of 16 codes cannot decode (a model's mistake, as a code past 127 is): the object keeps
    its box, its mask is None, and the answer counts one malformed part; a mask it can decode is decoded."""
    small = MaskVAE(MaskVAEConfig(hidden_dim=4, codebook_dim=8, codebook_size=16)).eval()
    box = (10, 6, 70, 40)
    past, within = format_object(box, SIZE, "past", range(3, 19)), format_object(box, SIZE, "within", range(16))
    got = parse_locations(past + " ; " + within, SIZE, small)
    assert [(o.label, o.box, o.codes) for o in got.objects] == [("past", bins_to_box(box_to_bins(box, SIZE), SIZE),
                                                                 tuple(range(3, 19))), ("within", got.objects[0].box,
                                                                                        tuple(range(16)))]
    assert got.objects[0].mask is None and got.objects[1].mask is not None and got.malformed == 1
    assert parse_locations(past, SIZE, small, boxes_only=True).malformed == 0  # no mask asked for: none is missing


def test_malformed_parts_are_counted_never_dropped(vae):
    good = format_object((10, 6, 70, 40), SIZE, "good")
    loc = "".join(LOC_TOKENS[i] for i in (100, 200, 300, 400))
    bad = [
        "".join(LOC_TOKENS[i] for i in (100, 200, 300)) + " three locations",
        "".join(LOC_TOKENS[i] for i in (300, 200, 100, 400)) + " y2 above y1",
        "".join(LOC_TOKENS[i] for i in (100, 400, 300, 400)) + " zero width",
        loc + "".join(SEG_TOKENS[:15]) + " fifteen seg tokens",
        loc + "<seg128>" * 16 + " a code past the codebook",
        "<loc1024><loc0000><loc1025><loc0005> a bin past 1023",
        "just words",
        "",
        "cat " + loc,
    ]
    got = parse_locations(" ; ".join([good, *bad, good]), SIZE, vae)
    assert [o.label for o in got.objects] == ["good", "good"]
    assert got.malformed == len(bad)
    assert parse_locations("", SIZE) == parse_locations("   ", SIZE)
    assert parse_locations("", SIZE).objects == [] and parse_locations("", SIZE).malformed == 0


@pytest.mark.parametrize("call, match", [
    (lambda: box_to_bins((10, 6, 5, 40), SIZE), "0 <= x1 < x2 <= width"),
    (lambda: box_to_bins((10, 6, 90, 40), SIZE), r"\(height, width\) = \(48, 80\)"),
    (lambda: box_to_bins((1, 2, 3), SIZE), r"\(x1, y1, x2, y2\)"),
    (lambda: bins_to_box([1, 2, 3, 1024], SIZE), r"four integers in \[0, 1024\)"),
    (lambda: parse_locations("x", (0, 10)), "image_size height must be an integer > 0"),
    (lambda: parse_locations("x", (1, 2, 3)), r"\(height, width\)"),
    (lambda: format_object((1, 1, 5, 5), SIZE, "a;b"), "cannot hold"),
    (lambda: format_object((1, 1, 5, 5), SIZE, "a", [1] * 15), "16 integers"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(pm.InputError, match=match):
        call()
