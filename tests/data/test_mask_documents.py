"""Masks in the user's JSONL documents: COCO RLE (list counts and the compressed string) decoded to hand-built
masks of known run lengths (and to pycocotools' masks where it is installed), COCO polygons, mask image files of
the modes people have, each read into the mode-L mask the world's segment task holds; bad masks are errors naming
the line and the field, eager or lazy; `write_jsonl` writes masks as PNG files that read back equal."""

import json

import numpy as np
import pytest
from PIL import Image

from polymodal.data.documents import DocumentError, read_jsonl, with_media, write_jsonl
from polymodal.data.masks import decode_rle, fill_polygon, polygons_source, rle_counts, rle_source
from polymodal.errors import InputError

from detection_data import compressed_counts, mask_in_each_form, mask_runs

H, W = 6, 8


def rectangle(top, left, bottom, right) -> np.ndarray:
    """A (H, W) bool mask, True on rows top..bottom-1 and columns left..right-1."""
    mask = np.zeros((H, W), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


# (size, counts, compressed string written out by hand from pycocotools' rleToString, the mask, built by hand)
def _hand_built():
    three = np.array([[0, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)  # column 0 out, 2 in down column 1, 4 out
    delta = np.zeros((5, 10), dtype=bool)  # 40 out (columns 0-7), 3 in, 2 out (column 8), 5 in (column 9)
    delta[0:3, 8] = delta[:, 9] = True
    negative = np.zeros((5, 10), dtype=bool)  # 10 out, 30 in (columns 2-7), 5 out, 5 in
    negative[:, 2:8] = negative[:, 9] = True
    # 40 = 8 + 1 * 32: groups 8 (| 0x20: more follows) and 1 -> "X1"; the 4th count is written as 5 - 3 = 2;
    # 30 has its 0x10 bit set, so a zero group follows to keep it positive -> "n0"; 5 - 30 = -25 -> groups 7 and
    # 31 (sign-extended) -> "WO"
    return [((3, 3), [3, 2, 4], "324", three), ((5, 10), [40, 3, 2, 5], "X1322", delta),
            ((5, 10), [10, 30, 5, 5], ":n05WO", negative)]


@pytest.mark.parametrize("size, counts, text, mask", _hand_built())
def test_rle_decodes_to_the_hand_built_mask_from_list_and_string_counts(size, counts, text, mask):
    assert rle_counts(text) == counts
    assert np.array_equal(decode_rle(size, counts), mask)
    for given in (counts, text):
        source = rle_source({"size": list(size), "counts": given})
        assert np.array_equal(source.pixels(size[1], size[0]), mask)
    assert mask_runs(mask) == counts and compressed_counts(counts) == text  # the tests' own writer agrees


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools 2.0 asks numpy 2 for copy=False
def test_rle_agrees_with_pycocotools():
    try:
        from pycocotools import mask as coco
    except ImportError:
        pytest.skip("pycocotools is not installed")
    rng = np.random.default_rng(0)
    for h, w, p in [(1, 1, 1.0), (7, 3, 0.5), (40, 33, 0.9), (64, 50, 0.02), (200, 3, 0.5)]:
        mask = rng.random((h, w)) < p
        mask[0, 0] = not mask[0, 0] if (h, w) != (1, 1) else mask[0, 0]
        rle = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert np.array_equal(decode_rle((h, w), rle_counts(rle["counts"].decode())), mask)
        assert np.array_equal(coco.decode(rle), mask)
        uncompressed = coco.frPyObjects({"size": [h, w], "counts": mask_runs(mask)}, h, w)
        assert uncompressed["counts"] == rle["counts"]  # the runs we build are COCO's


def test_polygons_are_filled_together_at_the_image_size():
    # a rectangle's corners in COCO's pixel coordinates are its box: rows 1-2 and columns 1-3 (pixel centres inside)
    two = polygons_source([[1, 1, 4, 1, 4, 3, 1, 3], [5, 3, 6, 3, 6, 5, 5, 5]])
    assert np.array_equal(two.pixels(W, H), rectangle(1, 1, 3, 4) | rectangle(3, 5, 5, 6))
    triangle = polygons_source([[0, 0, 8, 0, 0, 6]]).pixels(W, H)  # the half below the diagonal stays out
    assert triangle[0, 0] and triangle[2, 2] and not triangle[5, 7] and not triangle[3, 5]
    hourglass = polygons_source([[0, 0, 8, 6, 8, 0, 0, 6]]).pixels(W, H)  # crossing edges: even-odd
    assert hourglass[3, 0] and hourglass[3, 7] and not hourglass[0, 4] and not hourglass[5, 4]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_polygons_agree_with_pycocotools():
    try:
        from pycocotools import mask as coco
    except ImportError:
        pytest.skip("pycocotools is not installed")
    h, w = 40, 50
    for polygon in ([10, 10, 20, 10, 20, 30, 10, 30], [3, 0, 50, 0, 50, 40, 3, 40]):  # rectangles: exactly
        assert np.array_equal(polygons_source([polygon]).pixels(w, h),
                              coco.decode(coco.frPyObjects([polygon], h, w))[:, :, 0] > 0)
    rng = np.random.default_rng(0)
    for _ in range(100):  # simple polygons (star-shaped): they differ only where pycocotools' 1/5-pixel grid does
        n = int(rng.integers(3, 12))
        angles, radii = np.sort(rng.random(n)) * 2 * np.pi, rng.uniform(3, 18, n)
        polygon = np.stack([25 + radii * np.cos(angles), 20 + radii * np.sin(angles)], 1).round(2).reshape(-1)
        ours = fill_polygon(polygon.tolist(), w, h)
        theirs = coco.decode(coco.frPyObjects([polygon.tolist()], h, w))[:, :, 0] > 0
        rows, cols = np.nonzero(ours != theirs)
        assert (distance_to_edges(cols + 0.5, rows + 0.5, polygon) < 0.2).all()


def distance_to_edges(x: np.ndarray, y: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Each point's distance to the nearest edge of the polygon [x0, y0, x1, y1, ...]."""
    xs, ys = polygon[0::2], polygon[1::2]
    dx, dy = np.roll(xs, -1) - xs, np.roll(ys, -1) - ys
    t = np.clip(((x[:, None] - xs) * dx + (y[:, None] - ys) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(xs + t * dx - x[:, None], ys + t * dy - y[:, None]).min(1)


def write_doc(tmp_path, masks, image_size=(W, H), boxes=None) -> str:
    """data.jsonl with one document: an image of `image_size`, a prompt, and one object per given mask."""
    Image.new("RGB", image_size, (200, 10, 10)).save(tmp_path / "scene.png")
    boxes = boxes or [[1, 1, 4, 3]] * len(masks)
    objects = [{"label": f"thing {i}", "box": box, **({"mask": m} if m is not None else {})}
               for i, (m, box) in enumerate(zip(masks, boxes))]
    line = {"segments": [{"image": "scene.png"}, {"text": "segment thing"}, {"boxes": objects, "target": True}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(line) + "\n")
    return tmp_path / "data.jsonl"


def test_every_form_reads_into_the_same_mode_l_mask(tmp_path):
    mask = rectangle(1, 1, 3, 4)
    forms = mask_in_each_form(mask, tmp_path, "thing")
    polygon = [[1, 1, 4, 1, 4, 3, 1, 3]]
    Image.fromarray(mask.astype(np.uint8) * 255).convert("1").save(tmp_path / "1.png")
    palette = Image.frombytes("P", (W, H), (mask.astype(np.uint8) * 3).tobytes())  # class 3 of a VOC-style mask
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] * 64)
    palette.save(tmp_path / "P.png")
    Image.fromarray(np.stack([0 * mask, 0 * mask, mask * 9], -1).astype(np.uint8)).save(tmp_path / "RGB.png")
    files = ["1.png", "P.png", "RGB.png"]
    path = write_doc(tmp_path, [forms["file"], polygon, forms["rle"], forms["compressed"], *files])
    for doc in (read_jsonl(path)[0], with_media(read_jsonl(path, load_media=False)[0], path)):
        [objects] = [s for s in doc.segments if s.boxes]
        assert len(objects.masks) == 7
        for m in objects.masks:
            assert m.mode == "L" and m.size == (W, H)
            assert np.array_equal(np.asarray(m), mask * 255)


def test_reading_lazily_defers_the_mask_files(tmp_path):
    path = write_doc(tmp_path, ["later.png"])
    [objects] = [s for s in read_jsonl(path, load_media=False)[0].segments if s.boxes]
    assert objects.masks is None and objects.mask_sources[0].value == str(tmp_path / "later.png")
    with pytest.raises(DocumentError, match=r"data.jsonl, line 1, segments\[2\]\.boxes\[0\]\.mask: expected an "
                                            r"existing mask image file|missing"):
        with_media(read_jsonl(path, load_media=False)[0], path)


def _bad_rle(h=H, w=W):
    return {"size": [h, w], "counts": [h * w - 2, 2]}


BAD = [  # (the mask given, where the error points, what it says)
    (_bad_rle(H + 1, W), r"boxes\[0\]\.mask", r"image's size \(height, width\) = \(6, 8\), got \(7, 8\)"),
    (_bad_rle(10 ** 5, 10 ** 5), r"boxes\[0\]\.mask", r"got \(100000, 100000\)"),  # refused undecoded (10 GB)
    ({"size": [H, W], "counts": [H * W]}, r"boxes\[0\]\.mask", "at least one pixel inside, got an empty one"),
    ({"size": [H, W], "counts": [3, 4]}, r"boxes\[0\]\.mask", "covering size 6x8 = 48 pixels, got 7"),
    ({"size": [H, W], "counts": "3\x7f"}, r"boxes\[0\]\.mask", "compressed RLE string"),
    ({"size": [H, W], "counts": "X"}, r"boxes\[0\]\.mask", "ends inside a count"),
    ({"size": [H, W], "counts": [1, -1, 48]}, r"boxes\[0\]\.mask", "run lengths >= 0"),
    ({"size": [H, 0], "counts": []}, r"boxes\[0\]\.mask", "two positive integers"),
    ({"counts": [48]}, r"boxes\[0\]\.mask", "the keys 'size' and 'counts'"),
    ([[1, 1, 3, 1]], r"boxes\[0\]\.mask", "at least 3 points, got 4 number"),
    ([1, 1, 3, 1, 3, 3], r"boxes\[0\]\.mask", "wrap it in a list"),
    ([[40, 40, 50, 40, 50, 50]], r"boxes\[0\]\.mask", "empty one"),  # wholly outside the image
    (7, r"boxes\[0\]\.mask", "got a number"),
    ("junk.png", r"boxes\[0\]\.mask", "readable mask image file"),
    ("nowhere.png", r"boxes\[0\]\.mask", "missing"),
    ("small.png", r"boxes\[0\]\.mask", r"\(6, 8\), got \(3, 4\)"),
]


@pytest.mark.parametrize("mask, where, says", BAD)
@pytest.mark.parametrize("lazy", [False, True])
def test_a_bad_mask_is_an_error_naming_the_line_and_field(tmp_path, mask, where, says, lazy):
    (tmp_path / "junk.png").write_bytes(b"not a png")
    Image.new("L", (4, 3), 255).save(tmp_path / "small.png")
    path = write_doc(tmp_path, [mask])
    with pytest.raises(DocumentError, match=rf"data.jsonl, line 1, segments\[2\]\.{where}: .*{says}"):
        docs = read_jsonl(path, load_media=not lazy)
        with_media(docs[0], path)


def test_masks_on_some_objects_only_or_without_one_image_are_refused(tmp_path):
    mask = {"size": [H, W], "counts": [1, 2, H * W - 3]}
    with pytest.raises(DocumentError, match=r"line 1, segments\[2\]\.boxes\[1\]\.mask: .*on every object of the "
                                            "segment or on none"):
        read_jsonl(write_doc(tmp_path, [mask, None]))
    line = {"segments": [{"text": "segment thing"},
                         {"boxes": [{"label": "a", "box": [0, 0, 1, 1], "mask": mask}], "target": True}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(DocumentError, match=r"line 1, segments\[1\]\.boxes: expected one image whose pixels the "
                                            "masks cover, got 0"):
        read_jsonl(tmp_path / "data.jsonl")


def test_strict_paths_refuse_a_mask_file_outside_the_folder(tmp_path):
    (tmp_path / "inner").mkdir()
    Image.new("L", (W, H), 255).save(tmp_path / "outside.png")
    path = write_doc(tmp_path / "inner", ["../outside.png"])
    assert read_jsonl(path)[0]  # trusted like a script by default
    with pytest.raises(DocumentError, match=r"segments\[2\]\.boxes\[0\]\.mask: expected a path inside"):
        read_jsonl(path, strict_paths=True)


def test_written_masks_are_png_files_that_read_back_equal(tmp_path):
    mask = rectangle(2, 3, 5, 7)
    forms = mask_in_each_form(mask, tmp_path, "thing")
    docs = read_jsonl(write_doc(tmp_path, [forms["compressed"], forms["file"]]))
    write_jsonl(docs, tmp_path / "out" / "copy.jsonl")
    line = json.loads((tmp_path / "out" / "copy.jsonl").read_text())
    paths = [obj["mask"] for obj in line["segments"][2]["boxes"]]
    assert paths == ["copy_media/000000-2-mask0.png", "copy_media/000000-2-mask1.png"]
    for p in paths:
        saved = Image.open(tmp_path / "out" / p)
        assert saved.mode == "L" and np.array_equal(np.asarray(saved), mask * 255)
    [back] = read_jsonl(tmp_path / "out" / "copy.jsonl")
    assert [np.asarray(m).tolist() for m in back.segments[2].masks] == [(mask * 255).tolist()] * 2
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_a_lazily_read_document_is_not_written_without_its_masks(tmp_path):
    forms = mask_in_each_form(rectangle(0, 0, 2, 2), tmp_path, "thing")
    docs = read_jsonl(write_doc(tmp_path, [forms["rle"]]), load_media=False)
    docs = [docs[0].__class__(docs[0].segments[1:], docs[0].id)]  # the image left out: only the masks are unread
    with pytest.raises(InputError, match="masks are not loaded"):
        write_jsonl(docs, tmp_path / "out.jsonl")
