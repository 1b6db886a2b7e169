"""Image preprocessing: PIL images -> pixel_values.

`ImageProcessor` reproduces the PIL path of HF transformers' `SiglipImageProcessor` (SigLIP,
PaliGemma), `CLIPImageProcessor` (CLIP, KOSMOS-1) and `IdeficsImageProcessor`: resize with PIL
on uint8 pixels, center crop, rescale, normalize. `images_to_pixels` is Chameleon's scaling. The
audio front end (Whisper's log-mel) is `encoders.mel`.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from polymodal.errors import ConfigError, InputTypeError, MissingFileError
from polymodal.data.media import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {"bilinear": PIL.Image.Resampling.BILINEAR, "bicubic": PIL.Image.Resampling.BICUBIC}


@dataclass
class ImageProcessor:
    """PIL images -> (N, 3, H, W) float32.

    `size` (h, w) resizes straight to that size (SigLIP); an int resizes the shortest edge to it
    and keeps the aspect ratio (CLIP), which then needs `do_center_crop` to batch.
    """

    size: int | tuple[int, int] = (224, 224)
    resample: str = "bicubic"
    do_center_crop: bool = False
    crop_size: tuple[int, int] | None = None
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.size, list):
            self.size = tuple(self.size)
        if isinstance(self.crop_size, list):
            self.crop_size = tuple(self.crop_size)
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        sides = (self.size,) if isinstance(self.size, int) else self.size
        if len(sides) != (1 if isinstance(self.size, int) else 2) or min(sides) <= 0:
            raise ConfigError(f"size must be a positive int (shortest edge) or (h, w), got {self.size}")
        if self.resample not in _RESAMPLE:
            raise ConfigError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if self.do_center_crop and (self.crop_size is None or len(self.crop_size) != 2 or min(self.crop_size) <= 0):
            raise ConfigError(f"do_center_crop needs crop_size=(h, w) with positive sides, got {self.crop_size}")
        if isinstance(self.size, int) and not self.do_center_crop:
            raise ConfigError(f"size={self.size} (shortest edge) keeps the aspect ratio; set do_center_crop and crop_size")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0.0 in self.image_std:
            raise ConfigError(f"image_mean and image_std need 3 values, std nonzero; got {self.image_mean}, {self.image_std}")

    def __call__(self, images: list[PIL.Image.Image] | PIL.Image.Image) -> torch.Tensor:
        if isinstance(images, PIL.Image.Image):
            images = [images]
        if not images:
            raise ConfigError("expected at least one image, got an empty list")
        for i, image in enumerate(images):
            if not isinstance(image, PIL.Image.Image):
                raise InputTypeError(f"images[{i}]: expected a PIL.Image.Image, got {type(image).__name__}")
            if not self.do_convert_rgb and image.mode != "RGB":
                raise ConfigError(f"images[{i}] has mode {image.mode!r}; pass RGB images or set do_convert_rgb")
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        pixels = torch.stack([torch.from_numpy(self._resize_and_crop(image)) for image in images])
        # HF rescales in float64 and only then casts: keeps us bit-identical to its output.
        pixels = (pixels.permute(0, 3, 1, 2).double() * self.rescale_factor).float()
        return (pixels - mean) / std

    def _resize_and_crop(self, image: PIL.Image.Image) -> np.ndarray:
        if self.do_convert_rgb:
            image = to_rgb(image)
        w, h = image.size
        if isinstance(self.size, int):
            # int() truncation, as torchvision/HF do for the long edge.
            if w <= h:
                new_h, new_w = int(self.size * h / w), self.size
            else:
                new_h, new_w = self.size, int(self.size * w / h)
        else:
            new_h, new_w = self.size
        # Resampling uint8 pixels in PIL (not floats) is what HF does, rounding included.
        pixels = np.array(image.resize((new_w, new_h), resample=_RESAMPLE[self.resample]))
        return _center_crop(pixels, self.crop_size) if self.do_center_crop else pixels

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ImageProcessor":
        """From the dict of an HF `preprocessor_config.json` (SigLIP/PaliGemma, CLIP, Idefics)."""
        name = d.get("image_processor_type") or d.get("feature_extractor_type")
        kind = _HF_KINDS.get(str(name).removesuffix("Fast").removesuffix("Pil"))
        if kind is None:
            raise ConfigError(f"unsupported image processor {name!r}; supported: {sorted(_HF_KINDS)}")
        d = {**kind["defaults"], **d}
        if not d.get("do_resize", True):
            raise ConfigError(f"{name} with do_resize=False gives images of mixed sizes; polymodal needs one size")
        size = {"height": d["image_size"], "width": d["image_size"]} if "image_size" in d else d["size"]
        if isinstance(size, int):
            size = {"height": size, "width": size} if kind["int_is_square"] else {"shortest_edge": size}
        crop = d.get("crop_size")
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        resample = {int(v): k for k, v in _RESAMPLE.items()}.get(d.get("resample", 3))
        if resample is None:
            raise ConfigError(f"{name}: resample={d['resample']} is not bilinear (2) or bicubic (3)")
        normalize = d.get("do_normalize", True)
        return cls(
            size=size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"]),
            resample=resample,
            do_center_crop=bool(d.get("do_center_crop", False)),
            crop_size=(crop["height"], crop["width"]) if crop else None,
            rescale_factor=d.get("rescale_factor", 1 / 255) if d.get("do_rescale", True) else 1.0,
            image_mean=tuple(d["image_mean"]) if normalize else (0.0, 0.0, 0.0),
            image_std=tuple(d["image_std"]) if normalize else (1.0, 1.0, 1.0),
            do_convert_rgb=bool(d.get("do_convert_rgb", True)),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ImageProcessor":
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            raise MissingFileError(f"no preprocessor_config.json in {path}")
        return cls.from_hf_dict(json.loads(file.read_text()))


# Class defaults of the HF processors, used where a config file leaves a key out; an int `size`
# means the shortest edge unless the class defaults to square images.
_CLIP = {
    "defaults": {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                 "do_center_crop": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
    "int_is_square": False,
}
_HF_KINDS: dict[str, dict[str, Any]] = {
    "SiglipImageProcessor": {
        "defaults": {"size": {"height": 224, "width": 224}, "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3},
        "int_is_square": False,
    },
    "CLIPImageProcessor": _CLIP,
    "CLIPFeatureExtractor": _CLIP,  # older CLIP checkpoints, e.g. openai/clip-vit-large-patch14
    "IdeficsImageProcessor": {
        "defaults": {"size": {"height": 224, "width": 224}, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
        "int_is_square": True,
    },
}


def _center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crop (H, W, C) to `size` around the center, zero-padding where the image is smaller."""
    (h, w), (ch, cw) = pixels.shape[:2], size
    top, left = (h - ch) // 2, (w - cw) // 2
    src_y, src_x, dst_y, dst_x = max(top, 0), max(left, 0), max(-top, 0), max(-left, 0)
    n_y, n_x = min(h - src_y, ch - dst_y), min(w - src_x, cw - dst_x)
    out = np.zeros((ch, cw, pixels.shape[2]), dtype=pixels.dtype)
    out[dst_y:dst_y + n_y, dst_x:dst_x + n_x] = pixels[src_y:src_y + n_y, src_x:src_x + n_x]
    return out


def images_to_pixels(images: list[PIL.Image.Image], resolution: int) -> torch.Tensor:
    """PIL images -> (B, 3, R, R) float32 in [-1, 1], as Chameleon's processor scales them."""
    return ImageProcessor(size=(resolution, resolution), image_mean=(0.5,) * 3, image_std=(0.5,) * 3)(images)
