"""PaliGemma's answers with places (Beyer et al. 2024): boxes as `<locNNNN>` tokens, masks as `<segNNN>` tokens.

big_vision's conventions (`big_vision/pp/proj/paligemma/segmentation.py`, the PaliGemma evaluators): a box
is normalised `[y1, x1, y2, x2]`, each coordinate binned to `round(b * 1023)` clipped to 0..1023 and
written `<loc%04d>`, read back as bin / 1023 (so bins round-trip exactly); a mask is cropped to its box
(edges `round(h * y1)` ...), resized to 64x64 (bilinear, antialiased) and coded by the mask VQ-VAE
(`encoders/mask_vae.py`) into 16 `<seg%03d>` tokens; it decodes to 64x64 logits resized back into the box
(edges `int(h * y1)` ...), > 0 inside. One object is `<loc>x4[<seg>x16] label`; objects are joined by
` ; `. In HF's PaliGemma tokenizer the 1,024 location tokens follow Gemma's 256,000 pieces and the 128
segmentation tokens follow them (`paligemma_location_ids`).

Boxes in polymodal's API are `(x1, y1, x2, y2)` in pixels; images are `(height, width)`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from polymodal.encoders.mask_vae import MaskVAE
from polymodal.errors import InputError, UnknownNameError, check_number, check_text

N_LOC, N_SEG = 1024, 128
LOC_TOKENS = tuple(f"<loc{i:04d}>" for i in range(N_LOC))
SEG_TOKENS = tuple(f"<seg{i:03d}>" for i in range(N_SEG))
PALIGEMMA_FIRST_LOC_ID = 256000  # after Gemma's 256,000 pieces; the 128 seg tokens follow the locations
SEPARATOR = " ; "

_OBJECT = re.compile(r"((?:<loc\d{4}>){4})((?:<seg\d{3}>)*)\s*([^<>;]*)")
_NUMBER = re.compile(r"\d+")


def paligemma_location_ids() -> dict[str, int]:
    """Each `<locNNNN>` and `<segNNN>` token -> its id in HF PaliGemma's tokenizer (256000 .. 257151)."""
    return {token: PALIGEMMA_FIRST_LOC_ID + i for i, token in enumerate(LOC_TOKENS + SEG_TOKENS)}


def has_location_tokens(tokenizer) -> bool:
    """Does a polymodal `Tokenizer` hold the location tokens (`<loc0000>`..)?"""
    try:
        tokenizer.token_id(LOC_TOKENS[0])
    except UnknownNameError:
        return False
    return True


def add_location_tokens(tokenizer) -> dict[str, int]:
    """Register the 1,152 tokens in a polymodal `Tokenizer` (appended unless it has them, as PaliGemma's
    does): read whole in text, kept by decode. Returns token -> id."""
    tokens = LOC_TOKENS + SEG_TOKENS
    return dict(zip(tokens, tokenizer.add_tokens(list(tokens))))


def _image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2:
        raise InputError(f"image_size must be (height, width) or one int, got {image_size!r}")
    for name, value in zip(("height", "width"), size):
        check_number(f"image_size {name}", value, integer=True, above=0)
    return size  # type: ignore[return-value]


def _check_box(box: Sequence[float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise InputError(f"a box is (x1, y1, x2, y2) in pixels, got {box!r}")
    x1, y1, x2, y2 = (float(check_number(f"box {n}", v)) for n, v in zip(("x1", "y1", "x2", "y2"), box))
    h, w = size
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise InputError(f"box {tuple(box)} must satisfy 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height for an "
                         f"image of (height, width) = {size}")
    return x1, y1, x2, y2


def box_to_bins(box: Sequence[float], image_size: int | Sequence[int]) -> list[int]:
    """(x1, y1, x2, y2) in pixels -> big_vision's four bins [y1, x1, y2, x2], each round(b * 1023) in 0..1023."""
    size = _image_size(image_size)
    x1, y1, x2, y2 = _check_box(box, size)
    h, w = size
    normalised = torch.tensor([y1 / h, x1 / w, y2 / h, x2 / w], dtype=torch.float64)
    return torch.round(normalised * (N_LOC - 1)).clamp(0, N_LOC - 1).long().tolist()  # round half to even, as tf


def bins_to_box(bins: Sequence[int], image_size: int | Sequence[int]) -> tuple[float, float, float, float]:
    """Four bins [y1, x1, y2, x2] -> (x1, y1, x2, y2) in pixels (bin / 1023 of the side)."""
    h, w = _image_size(image_size)
    if len(bins) != 4 or any(not 0 <= int(b) < N_LOC for b in bins):
        raise InputError(f"bins must be four integers in [0, {N_LOC}), got {list(bins)}")
    y1, x1, y2, x2 = (int(b) / (N_LOC - 1) for b in bins)
    return x1 * w, y1 * h, x2 * w, y2 * h


def crop_mask(mask: torch.Tensor, box: Sequence[float], size: int = 64) -> torch.Tensor:
    """An image's mask (H, W) -> its box's part resized to (size, size) in [0, 1], as big_vision crops it."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise InputError(f"mask must be a (height, width) tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    x1, y1, x2, y2 = _check_box(box, tuple(mask.shape))
    top, left, bottom, right = (int(torch.tensor(v, dtype=torch.float64).round()) for v in (y1, x1, y2, x2))
    top, left = min(top, mask.shape[0] - 1), min(left, mask.shape[1] - 1)  # a sliver at the edge keeps a pixel
    crop = mask[top:max(bottom, top + 1), left:max(right, left + 1)].float()[None, None]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0].clamp(0, 1)


def paste_mask(logits: torch.Tensor, box: Sequence[float], image_size: int | Sequence[int]) -> torch.Tensor:
    """Mask logits (S, S) of a box -> the image's mask (H, W) bool: resized into the box, > 0 inside."""
    size = _image_size(image_size)
    x1, y1, x2, y2 = _check_box(box, size)
    top, left, bottom, right = int(y1), int(x1), int(y2), int(x2)  # big_vision's evaluator truncates
    out = torch.zeros(size, dtype=torch.bool)
    if bottom > top and right > left:
        inside = F.interpolate(logits.float()[None, None], size=(bottom - top, right - left), mode="bilinear",
                               align_corners=False)[0, 0]
        out[top:bottom, left:right] = inside > 0
    return out


@dataclass(frozen=True)
class LocatedObject:
    label: str
    box: tuple[float, float, float, float]  # (x1, y1, x2, y2) in pixels
    mask: torch.Tensor | None = None  # (H, W) bool; None when the answer gave no segmentation tokens (or boxes_only)
    codes: tuple[int, ...] = ()  # the answer's 16 segmentation codes of the object, () when it gave none


@dataclass(frozen=True)
class Locations:
    objects: list[LocatedObject]
    malformed: int  # parts of the answer that were not one well-formed object, masks its VAE cannot decode (counted,
    # never dropped silently)


def format_object(box: Sequence[float], image_size: int | Sequence[int], label: str = "",
                  codes: Sequence[int] | None = None) -> str:
    """One object as PaliGemma writes it: four location tokens, sixteen segmentation tokens if `codes`, label."""
    check_text(label, "label")
    if re.search(r"[<>;]", label) or label != label.strip():
        raise InputError(f"a label cannot hold '<', '>' or ';' nor start or end with a space, got {label!r}")
    text = "".join(LOC_TOKENS[b] for b in box_to_bins(box, image_size))
    if codes is not None:
        if len(codes) != 16 or any(not 0 <= int(c) < N_SEG for c in codes):
            raise InputError(f"codes must be 16 integers in [0, {N_SEG}), got {list(codes)}")
        text += "".join(SEG_TOKENS[int(c)] for c in codes)
    return f"{text} {label}" if label else text


def format_locations(objects: Sequence[str]) -> str:
    """Objects (from `format_object`) joined as PaliGemma joins them."""
    return SEPARATOR.join(objects)


def encode_mask(mask: torch.Tensor, box: Sequence[float], vae: MaskVAE) -> list[int]:
    """An image's mask (H, W) of the object in `box` -> its 16 codes."""
    with torch.no_grad():
        return vae.encode(crop_mask(mask, box, vae.config.mask_size)[None])[0].tolist()


def _parse_object(part: str, size: tuple[int, int], vae: MaskVAE | None, boxes_only: bool) -> LocatedObject | None:
    match = _OBJECT.fullmatch(part.strip())
    if match is None:
        return None
    bins = [int(n) for n in _NUMBER.findall(match[1])]
    codes = [int(n) for n in _NUMBER.findall(match[2])]
    if max(bins) >= N_LOC or bins[2] <= bins[0] or bins[3] <= bins[1] or len(codes) not in (0, 16) or \
            any(c >= N_SEG for c in codes):
        return None  # big_vision's invalid answers: a bin past 1023, an empty box, a partial mask
    box = bins_to_box(bins, size)
    mask = None
    if codes and not boxes_only:
        if vae is None:
            raise InputError("this answer holds segmentation tokens: pass vae= (load_mask_vae('vae-oid.npz')) to "
                             "decode its masks, or boxes_only=True to leave them out")
        if max(codes) < vae.config.codebook_size:  # codes past this VAE's codebook: no mask (parse_locations counts it)
            with torch.no_grad():
                mask = paste_mask(vae.decode(torch.tensor([codes]))[0], box, size)
    return LocatedObject(match[3].strip(), box, mask, tuple(codes))


def parse_locations(text: str, image_size: int | Sequence[int], vae: MaskVAE | None = None, *,
                    boxes_only: bool = False) -> Locations:
    """The objects of a detection or segmentation answer: label, box in pixels, mask if it has one.

    `image_size`: (height, width) of the image the boxes refer to. `vae`: the mask VQ-VAE, needed only if
    the answer holds segmentation tokens and `boxes_only` is False; with `boxes_only` no mask is decoded (each
    object's `codes` keep its segmentation tokens). A part between separators that is not one well-formed object
    (a partial mask included) counts in `malformed`, as does a mask whose codes lie past `vae`'s codebook: its
    object keeps its box, its mask None."""
    check_text(text)
    size = _image_size(image_size)
    objects, malformed = [], 0
    for part in text.split(";") if text.strip() else []:
        obj = _parse_object(part, size, vae, boxes_only)
        if obj is not None:
            objects.append(obj)
        malformed += obj is None or (obj.codes != () and obj.mask is None and not boxes_only)
    return Locations(objects, malformed)


COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def draw_locations(image: Image.Image, locations: Locations) -> Image.Image:
    """A copy of the image (RGB) with each object's mask tinted at half strength, its box outlined one pixel
    wide on the box's edges and its label written inside the top-left corner, in one colour per object."""
    out = image.convert("RGB")
    for i, obj in enumerate(locations.objects):
        colour = COLOURS[i % len(COLOURS)]
        if obj.mask is not None:
            pixels = np.asarray(out).copy()
            inside = obj.mask.numpy()
            pixels[inside] = (pixels[inside] + np.array(colour)) // 2
            out = Image.fromarray(pixels)
        draw = ImageDraw.Draw(out)
        x1, y1, x2, y2 = obj.box
        # the box's last pixel row and column are x2 - 1, y2 - 1 (x2, y2 are its end, as in a slice)
        draw.rectangle((round(x1), round(y1), max(round(x2) - 1, round(x1)), max(round(y2) - 1, round(y1))),
                       outline=colour)
        if obj.label:
            draw.text((round(x1) + 2, round(y1) + 1), obj.label, fill=colour)
    return out
