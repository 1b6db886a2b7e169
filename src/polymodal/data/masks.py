"""Object masks as users keep them -> the mask a `Segment` holds (mode L, 255 inside, the image's size).

A document's object may give its mask as a mask image file (`media.open_mask`: nonzero is inside), or in COCO's
two forms (Lin et al. 2014; the layout of the `segmentation` field of COCO's annotation files, which
`pycocotools.mask` reads):
- polygons `[[x0, y0, x1, y1, ...], ...]` in pixels (pixel (x, y) spans x..x+1, y..y+1, as COCO's areas
  count), each of at least three points, filled together: a pixel is inside when its centre is (even-odd rule);
  pycocotools' rasterizer, which walks the boundary at 5x resolution, agrees but for some boundary pixels;
- run-length encoding `{"size": [h, w], "counts": ...}`: runs over the pixels in column-major order
  (down each column, then the next column), alternating outside and inside and starting outside; `counts` a
  list of run lengths (COCO's "uncompressed RLE") or the string `pycocotools` writes ("compressed RLE": each
  count in 5-bit groups, least significant first, as characters 48 + group, 0x20 marking that more groups
  follow, the last group's 0x10 bit its sign; from the fourth count on, the difference from the count two
  before).

Parsing (`polygons_source`, `rle_source`) checks a mask's form without its image; `MaskSource.pixels` draws it
at the image's size. Every problem is an InputError saying what was expected and what was given.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from polymodal.data import media
from polymodal.errors import InputError

MAX_MASK_PIXELS = 8192 * 8192  # as for images (documents.MAX_IMAGE_PIXELS)


@dataclass(frozen=True)
class MaskSource:
    """Where one object's mask comes from: kind "file" (value: its path), "polygons" (a list of flat
    [x0, y0, ...] lists) or "rle" (value: ((h, w), run lengths))."""

    kind: str
    value: Any

    def pixels(self, width: int, height: int) -> np.ndarray:
        """The mask at the image's size: (height, width) bool. InputError if its size is another or it is empty."""
        if self.kind == "polygons":
            inside = np.logical_or.reduce([fill_polygon(p, width, height) for p in self.value])
        else:  # an RLE's size is checked before it is decoded (a size a file's header does not back)
            inside = _open(self.value) if self.kind == "file" else None
            size = inside.shape if inside is not None else self.value[0]
            if size != (height, width):
                raise InputError(f"expected a mask of the image's size (height, width) = {(height, width)}, got "
                                 f"{size}{f' in {self.value!r}' if self.kind == 'file' else ''}")
            inside = decode_rle(*self.value) if inside is None else inside
        if not inside.any():
            raise InputError(f"expected a mask with at least one pixel inside, got an empty one"
                             f"{f' ({self.value!r})' if self.kind == 'file' else ''}")
        return inside


def fill_polygon(polygon: list[float], width: int, height: int) -> np.ndarray:
    """(height, width) bool: the pixels whose centres lie inside the polygon [x0, y0, x1, y1, ...] (even-odd)."""
    xs, ys = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
    xe, ye = np.roll(xs, -1), np.roll(ys, -1)  # each edge's end
    centres = np.arange(width) + 0.5
    out = np.zeros((height, width), dtype=bool)
    for row in range(max(0, math.floor(ys.min())), min(height, math.ceil(ys.max()))):
        y = row + 0.5
        crossing = (ys <= y) != (ye <= y)  # edges the row's centre line crosses (half-open: a vertex counts once)
        at = np.sort(xs[crossing] + (y - ys[crossing]) * (xe[crossing] - xs[crossing]) / (ye[crossing] - ys[crossing]))
        out[row] = np.searchsorted(at, centres) % 2 == 1  # an odd number of crossings left of the centre
    return out


def mask_image(inside: np.ndarray) -> Image.Image:
    """(H, W) bool -> the mask a Segment holds: mode L, 255 inside, 0 outside."""
    return Image.fromarray(np.where(inside, 255, 0).astype(np.uint8))  # 2-D uint8: mode L


def _open(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        given = "directory" if os.path.isdir(path) else "missing file"
        raise InputError(f"expected an existing mask image file, got {given} {path!r}")
    try:
        return media.open_mask(path, MAX_MASK_PIXELS)
    except media.TooLarge as e:
        raise InputError(f"expected a mask image of at most {MAX_MASK_PIXELS:,} pixels, got {path!r} of "
                         f"{e.width}x{e.height}") from e
    except (OSError, EOFError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"expected a readable mask image file, got {path!r} ({e})") from e


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def polygons_source(value: Any) -> MaskSource:
    """COCO polygons: a non-empty list of flat [x0, y0, x1, y1, ...] lists, each of >= 3 points."""
    if not isinstance(value, list) or not value or not all(isinstance(p, list) for p in value):
        given = "an empty list" if value == [] else "a list of numbers (one flat polygon: wrap it in a list)" \
            if isinstance(value, list) and all(_number(v) for v in value) else "a list holding a non-list"
        raise InputError(f"expected COCO polygons [[x0, y0, x1, y1, ...], ...], got {given}")
    for i, polygon in enumerate(value):
        if not all(_number(v) for v in polygon):
            raise InputError(f"expected polygon {i} to hold finite numbers, got {polygon!r:.80}")
        if len(polygon) % 2 or len(polygon) < 6:
            raise InputError(f"expected polygon {i} to be x, y pairs of at least 3 points, got {len(polygon)} "
                             f"number(s)")
    return MaskSource("polygons", [[float(v) for v in p] for p in value])


def rle_source(value: dict) -> MaskSource:
    """COCO run-length encoding {"size": [h, w], "counts": list or string}; the counts must cover h * w pixels."""
    if set(value) != {"size", "counts"}:
        raise InputError(f"expected a COCO RLE with the keys 'size' and 'counts', got the keys {sorted(value)}")
    size, counts = value["size"], value["counts"]
    if (not isinstance(size, list) or len(size) != 2 or
            not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise InputError(f"expected size [height, width] of two positive integers, got {size!r}")
    if isinstance(counts, str):
        counts = rle_counts(counts)
    elif not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        raise InputError(f"expected counts as a list of run lengths or COCO's compressed string, got "
                         f"{type(counts).__name__}{'' if not isinstance(counts, list) else ' with a non-integer'}")
    if any(c < 0 for c in counts):
        raise InputError(f"expected run lengths >= 0, got {min(counts)}")
    h, w = size
    if sum(counts) != h * w:
        raise InputError(f"expected run lengths covering size {h}x{w} = {h * w} pixels, got {sum(counts)}")
    return MaskSource("rle", ((h, w), counts))  # decoded at the image's size only (`pixels`)


def rle_counts(text: str) -> list[int]:
    """COCO's compressed RLE string -> its run lengths (the inverse of pycocotools' `rleToString`)."""
    counts: list[int] = []
    i = 0
    while i < len(text):
        value, shift, more = 0, 0, True
        while more:
            if i >= len(text):
                raise InputError(f"expected a COCO compressed RLE string, got {text!r:.80}, which ends inside a count")
            group = ord(text[i]) - 48
            if not 0 <= group < 64:
                raise InputError(f"expected a COCO compressed RLE string (characters '0' to 'o'), got {text[i]!r} at "
                                 f"character {i + 1}")
            value |= (group & 0x1F) << shift
            more, shift, i = bool(group & 0x20), shift + 5, i + 1
            if not more and group & 0x10:  # the sign of the last group: extend it
                value -= 1 << shift
        counts.append(value + (counts[-2] if len(counts) > 2 else 0))
    return counts


def decode_rle(size: tuple[int, int], counts: list[int]) -> np.ndarray:
    """Run lengths over the (h, w) pixels in column-major order, outside first -> (h, w) bool."""
    h, w = size
    values = np.arange(len(counts)) % 2 == 1  # the runs alternate outside, inside
    return np.repeat(values, counts).reshape(w, h).T
