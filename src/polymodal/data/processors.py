"""Image and audio preprocessing: PIL images -> pixel_values, 16 kHz waveforms -> log-mel features.

`ImageProcessor` reproduces the PIL path of HF transformers' `SiglipImageProcessor` (SigLIP,
PaliGemma), `CLIPImageProcessor` (CLIP, KOSMOS-1) and `IdeficsImageProcessor`: resize with PIL
on uint8 pixels, center crop, rescale, normalize. `AudioFeatureExtractor` reproduces Whisper's
log-mel spectrogram (Radford et al. 2022; HF `WhisperFeatureExtractor`): Hann-window STFT,
Slaney mel filterbank, log10, floor at 8 decades below the peak, scale to about [-1, 1].
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

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
            raise ValueError(f"size must be a positive int (shortest edge) or (h, w), got {self.size}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if self.do_center_crop and (self.crop_size is None or len(self.crop_size) != 2 or min(self.crop_size) <= 0):
            raise ValueError(f"do_center_crop needs crop_size=(h, w) with positive sides, got {self.crop_size}")
        if isinstance(self.size, int) and not self.do_center_crop:
            raise ValueError(f"size={self.size} (shortest edge) keeps the aspect ratio; set do_center_crop and crop_size")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0.0 in self.image_std:
            raise ValueError(f"image_mean and image_std need 3 values, std nonzero; got {self.image_mean}, {self.image_std}")

    def __call__(self, images: list[PIL.Image.Image] | PIL.Image.Image) -> torch.Tensor:
        if isinstance(images, PIL.Image.Image):
            images = [images]
        if not images:
            raise ValueError("expected at least one image, got an empty list")
        for i, image in enumerate(images):
            if not isinstance(image, PIL.Image.Image):
                raise TypeError(f"images[{i}]: expected a PIL.Image.Image, got {type(image).__name__}")
            if not self.do_convert_rgb and image.mode != "RGB":
                raise ValueError(f"images[{i}] has mode {image.mode!r}; pass RGB images or set do_convert_rgb")
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        pixels = torch.stack([torch.from_numpy(self._resize_and_crop(image)) for image in images])
        # HF rescales in float64 and only then casts: keeps us bit-identical to its output.
        pixels = (pixels.permute(0, 3, 1, 2).double() * self.rescale_factor).float()
        return (pixels - mean) / std

    def _resize_and_crop(self, image: PIL.Image.Image) -> np.ndarray:
        if self.do_convert_rgb:
            image = _to_rgb(image)
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
            raise ValueError(f"unsupported image processor {name!r}; supported: {sorted(_HF_KINDS)}")
        d = {**kind["defaults"], **d}
        if not d.get("do_resize", True):
            raise ValueError(f"{name} with do_resize=False gives images of mixed sizes; polymodal needs one size")
        size = {"height": d["image_size"], "width": d["image_size"]} if "image_size" in d else d["size"]
        if isinstance(size, int):
            size = {"height": size, "width": size} if kind["int_is_square"] else {"shortest_edge": size}
        crop = d.get("crop_size")
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        resample = {int(v): k for k, v in _RESAMPLE.items()}.get(d.get("resample", 3))
        if resample is None:
            raise ValueError(f"{name}: resample={d['resample']} is not bilinear (2) or bicubic (3)")
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
            raise FileNotFoundError(f"no preprocessor_config.json in {path}")
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


def check_pixel_values(pixel_values: torch.Tensor, channels: int, size: int, batch: str = "num_images") -> None:
    """A clear error unless pixel_values is (batch, channels, size, size), the batch dimension named `batch`."""
    expected = (channels, size, size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(f"pixel_values must be ({batch}, {', '.join(map(str, expected))}), "
                         f"got {tuple(pixel_values.shape)}")


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    # Transparent pixels become white, not black, as in HF's convert_to_rgb.
    if "A" in image.getbands() or "transparency" in image.info:
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crop (H, W, C) to `size` around the center, zero-padding where the image is smaller."""
    (h, w), (ch, cw) = pixels.shape[:2], size
    top, left = (h - ch) // 2, (w - cw) // 2
    src_y, src_x, dst_y, dst_x = max(top, 0), max(left, 0), max(-top, 0), max(-left, 0)
    n_y, n_x = min(h - src_y, ch - dst_y), min(w - src_x, cw - dst_x)
    out = np.zeros((ch, cw, pixels.shape[2]), dtype=pixels.dtype)
    out[dst_y:dst_y + n_y, dst_x:dst_x + n_x] = pixels[src_y:src_y + n_y, src_x:src_x + n_x]
    return out


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    # Slaney's scale: linear below 1 kHz, logarithmic above.
    log_part = 15.0 + torch.log(f.clamp(min=1000.0) / 1000.0) * (27.0 / math.log(6.4))
    return torch.where(f >= 1000.0, log_part, 3.0 * f / 200.0)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    log_part = 1000.0 * torch.exp((m.clamp(min=15.0) - 15.0) * (math.log(6.4) / 27.0))
    return torch.where(m >= 15.0, log_part, 200.0 * m / 3.0)


def mel_filterbank(n_mels: int, n_fft: int, sampling_rate: int) -> torch.Tensor:
    """Slaney-normalized triangular mel filters over 0..sampling_rate/2, (n_fft // 2 + 1, n_mels) float32."""
    nyquist = torch.tensor(sampling_rate / 2, dtype=torch.float64)
    edges = _mel_to_hz(torch.linspace(0.0, float(_hz_to_mel(nyquist)), n_mels + 2, dtype=torch.float64))
    bins = torch.linspace(0.0, float(nyquist), n_fft // 2 + 1, dtype=torch.float64)
    offsets = edges[None, :] - bins[:, None]  # (F, M+2)
    widths = edges.diff()
    rising, falling = -offsets[:, :-2] / widths[:-1], offsets[:, 2:] / widths[1:]
    filters = torch.minimum(rising, falling).clamp(min=0.0)
    # Area normalization keeps the energy per channel roughly constant across the scale.
    filters = filters * (2.0 / (edges[2:] - edges[:-2]))
    empty = (filters.amax(dim=0) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mel filters {empty} are empty: n_mels={n_mels} is too many for n_fft={n_fft}")
    return filters.float()


@dataclass
class AudioFeatureExtractor:
    """Mono waveform -> (n_mels, chunk_length * sampling_rate // hop_length) log-mel, as Whisper.

    Waveforms are zero-padded or truncated to `chunk_length` seconds; smaller `chunk_length`
    and `n_mels` give tiny models short inputs.
    """

    n_mels: int = 80
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400
    chunk_length: int = 30
    _filters: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if min(self.n_mels, self.sampling_rate, self.hop_length, self.n_fft, self.chunk_length) <= 0:
            raise ValueError(f"all sizes must be positive, got {self}")
        self._filters = mel_filterbank(self.n_mels, self.n_fft, self.sampling_rate)

    @property
    def n_samples(self) -> int:
        return self.chunk_length * self.sampling_rate

    @property
    def n_frames(self) -> int:
        return self.n_samples // self.hop_length

    def __call__(self, waveform: np.ndarray | list[np.ndarray], *, sampling_rate: int) -> torch.Tensor:
        """One 1-D waveform -> (n_mels, n_frames); a list of them -> (B, n_mels, n_frames)."""
        if sampling_rate != self.sampling_rate:
            raise ValueError(f"expected audio sampled at {self.sampling_rate} Hz, got {sampling_rate} Hz; resample it first")
        batch = [waveform] if isinstance(waveform, np.ndarray) else list(waveform)
        if not batch:
            raise ValueError("expected at least one waveform, got an empty list")
        x = torch.zeros(len(batch), self.n_samples)
        for i, wave in enumerate(batch):
            if not isinstance(wave, np.ndarray) or wave.ndim != 1:
                raise ValueError(f"waveform {i}: expected a 1-D (mono) numpy array, got {getattr(wave, 'shape', type(wave))}")
            if not np.issubdtype(wave.dtype, np.floating):
                raise ValueError(f"waveform {i}: expected float samples in [-1, 1], got dtype {wave.dtype}")
            wave = wave[: self.n_samples]
            x[i, : len(wave)] = torch.from_numpy(wave.astype(np.float32))
        features = self._log_mel(x)
        return features[0] if isinstance(waveform, np.ndarray) else features

    def _log_mel(self, x: torch.Tensor) -> torch.Tensor:
        window = torch.hann_window(self.n_fft)
        stft = torch.stft(x, self.n_fft, self.hop_length, window=window, return_complex=True)
        power = stft[..., :-1].abs() ** 2  # Whisper drops the last frame: n_samples / hop frames
        log_mel = (self._filters.T @ power).clamp(min=1e-10).log10()  # (B, n_mels, T)
        # Keep 8 decades below each clip's peak, then scale to about [-1, 1].
        log_mel = torch.maximum(log_mel, log_mel.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log_mel + 4.0) / 4.0
