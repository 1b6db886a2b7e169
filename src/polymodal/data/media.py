"""Media decoding every entry point shares (training data, `polymodal generate`, the server): images of any
mode PIL opens -> RGB, mask image files -> bool (`open_mask`), wav files of any common layout -> mono
float32, and band-limited resampling.

Images: the EXIF orientation is applied (as HF's `load_image` does; an unreadable EXIF block is ignored, as
viewers ignore it); 16-bit greyscale (`I;16*`) is scaled from its full range 0..65535, 32-bit integer (`I`) from
0..65535 when its values fit there (what PIL gives for 16-bit PNGs) and from its own min..max otherwise, float
(`F`) from 0..1 when its values fit there and from its own min..max otherwise, a TIFF's WhiteIsZero honoured at
every depth (PIL honours it at 1 and 8 bits only); transparency (`RGBA`, `LA`, `PA`, `P` with a transparent
colour) is composited on white, as HF's `convert_to_rgb` does; CMYK, palette and the rest go through PIL's
conversion.

Audio: RIFF/WAVE with integer PCM of 8 (unsigned), 16, 24 or 32 bits, or IEEE float of 32 or 64 bits, plain
or WAVE_FORMAT_EXTENSIBLE, any number of channels (averaged to mono, as HF's ffmpeg reader downmixes); float
samples past full scale (|x| > 1) are clipped to it, as a player clips them.
`resample` is windowed-sinc (Hann) polyphase resampling between any two integer rates, the method of
torchaudio's `functional.resample` (Smith, "Digital Audio Resampling"), written here in numpy.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from polymodal.errors import InputError

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_TRANSPARENT = ("RGBA", "RGBa", "LA", "La", "PA")
_WAVE_FORMATS = {1: "PCM", 3: "IEEE float"}
MAX_PHASES = 4096  # every pair of common rates (8 kHz .. 192 kHz, 11.025 kHz multiples) reduces below this
_NAMED_FORMATS = {2: "ADPCM", 6: "A-law", 7: "mu-law", 0x11: "IMA ADPCM", 0x55: "MP3"}
_DAMAGED = (SyntaxError, RuntimeError, TypeError, IndexError, struct.error)  # from Pillow's plugins, for damaged files


# ---------------------------------------------------------------------------------------------
# images

def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB as a user sees it: orientation applied, wide greyscale scaled by its
    range, transparency on white. InputError for float pixels that are NaN or infinite."""
    white_is_zero = getattr(image, "tag_v2", {}).get(262) == 0  # a TIFF's photometric (PIL inverts 8 bits only)
    image = ImageOps.exif_transpose(image) if _orientation(image) != 1 else image
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        image = _wide_grey_to_l(image, white_is_zero)
    if image.mode in _TRANSPARENT or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise InputError(f"expected an image PIL can turn into RGB, got mode {image.mode!r} ({e})") from e


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag, 1 (as stored) when the file's EXIF block is unreadable: viewers then show the
    pixels as stored (Pillow raised SyntaxError or struct.error for a PNG's broken eXIf chunk)."""
    try:
        return image.getexif().get(0x0112, 1)
    except (SyntaxError, struct.error, ValueError, OSError):
        return 1


def _wide_grey_to_l(image: Image.Image, white_is_zero: bool = False) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F" and not np.isfinite(pixels).all():
        raise InputError(f"expected finite pixels, got a float (mode F) image with "
                         f"{int((~np.isfinite(pixels)).sum())} NaN or infinite pixels")
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if image.mode in _SIXTEEN_BIT or (image.mode == "I" and low >= 0 and high <= 65535):
        low, high = 0.0, 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    scaled = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    scaled = 1 - scaled if white_is_zero else scaled
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8), mode="L")


class TooLarge(InputError):
    """An image whose header declares more pixels than allowed."""

    def __init__(self, width: int, height: int, limit: int):
        super().__init__(f"{width}x{height} pixels, over the limit of {limit:,} pixels")
        self.width, self.height = width, height


def open_image(source: str | Path | bytes, max_pixels: int) -> Image.Image:
    """An image file (a path or its bytes) decoded to RGB by `to_rgb`. TooLarge if it has more than
    `max_pixels` pixels (read from the header, before decoding); InputError or PIL's own errors (OSError and the
    like) for unreadable bytes."""
    with _decoded(source, max_pixels) as im:
        return to_rgb(im)


def open_mask(source: str | Path, max_pixels: int) -> np.ndarray:
    """A mask image file -> (height, width) bool, True where a pixel is nonzero: its value (modes 1, L, I, F),
    its palette index (P: VOC's class-index masks) or any colour channel (RGB, RGBA: black is outside).
    Errors as `open_image`."""
    with _decoded(source, max_pixels) as im:
        pixels = np.asarray(im if im.mode in ("1", "L", "P", "I", "F") or im.mode in _SIXTEEN_BIT
                            else im.convert("RGB"))
    return pixels.any(axis=2) if pixels.ndim == 3 else pixels != 0


@contextlib.contextmanager
def _decoded(source: str | Path | bytes, max_pixels: int) -> Iterator[Image.Image]:
    """The image file opened and decoded whole, so corruption shows up here. Pillow's plugins report some damaged
    files with errors no caller expects of a file (a PNG's broken chunk after its pixels: SyntaxError; an AVIF's
    missing item: RuntimeError; a TIFF's fractional tag: TypeError): those become InputError."""
    try:
        im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        try:
            if im.width * im.height > max_pixels:
                raise TooLarge(im.width, im.height, max_pixels)
            im.load()
        except BaseException:
            im.close()
            raise
    except _DAMAGED as e:
        raise InputError(f"{type(e).__name__}: {e}") from e
    with im:
        yield im


# ---------------------------------------------------------------------------------------------
# audio

def read_wav(f: str | Path | BinaryIO) -> tuple[np.ndarray, int]:
    """A wav file -> (mono float32 waveform, sample rate). ValueError saying what the file holds when it is
    not a readable RIFF/WAVE file of PCM or float samples, or when its samples are not finite."""
    data = Path(f).read_bytes() if isinstance(f, (str, Path)) else f.read()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise InputError(f"not a RIFF/WAVE file (starts with {data[:12]!r})")
    chunks, pos = {}, 12
    while pos + 8 <= len(data):
        name, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        chunks.setdefault(name, data[pos + 8:pos + 8 + size])
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    if b"fmt " not in chunks or len(chunks[b"fmt "]) < 16:
        raise InputError("no format chunk ('fmt ')")
    if b"data" not in chunks:
        raise InputError("no data chunk")
    tag, channels, rate, _, align, bits = struct.unpack("<HHIIHH", chunks[b"fmt "][:16])
    if tag == 0xFFFE and len(chunks[b"fmt "]) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the GUID
        tag = struct.unpack("<H", chunks[b"fmt "][24:26])[0]
    if tag not in _WAVE_FORMATS:
        raise InputError(f"{_NAMED_FORMATS.get(tag, f'format tag {tag}')}-encoded samples; expected PCM or IEEE float")
    if channels < 1 or rate < 1 or bits not in ((8, 16, 24, 32) if tag == 1 else (32, 64)):
        raise InputError(f"{bits}-bit {_WAVE_FORMATS[tag]} samples in {channels} channel(s) at {rate} Hz; expected "
                         f"{'8, 16, 24 or 32' if tag == 1 else '32 or 64'}-bit samples, >= 1 channel, a rate > 0")
    raw = chunks[b"data"]
    width = bits // 8
    usable = len(raw) - len(raw) % (width * channels)
    samples = _decode(raw[:usable], tag, width).reshape(-1, channels)
    if not np.isfinite(samples).all():
        raise InputError(f"{int((~np.isfinite(samples)).sum())} samples are NaN or infinite")
    # float samples past full scale play clipped; 1e30 of them overflowed the log-mel's power to NaN
    return np.clip(samples, -1.0, 1.0).mean(axis=1).astype(np.float32), rate


def _decode(raw: bytes, tag: int, width: int) -> np.ndarray:
    if tag == 3:
        return np.frombuffer(raw, dtype="<f4" if width == 4 else "<f8").astype(np.float64)
    if width == 1:  # 8-bit wav is unsigned
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128) / 128
    if width == 3:  # little-endian 24-bit: widen to 32 bits through the top three bytes
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        return ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8) / float(1 << 23)
    x = np.frombuffer(raw, dtype="<i2" if width == 2 else "<i4").astype(np.float64)
    return x / (32767 if width == 2 else (1 << 31) - 1)  # -32768 / 32767 is clipped with the rest


def check_waveform(waveform: np.ndarray, sample_rate: object) -> None:
    """InputError unless `waveform` is 1-D finite floats and `sample_rate` a positive integer."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1:
        raise InputError(f"an audio clip's sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    if not isinstance(waveform, np.ndarray) or waveform.ndim != 1 or not np.issubdtype(waveform.dtype, np.floating):
        given = f"{getattr(waveform, 'dtype', type(waveform).__name__)} of shape {getattr(waveform, 'shape', ())}"
        raise InputError(f"an audio clip must be a 1-D float numpy waveform, got {given}")
    if not np.isfinite(waveform).all():
        raise InputError(f"an audio clip must hold finite samples, got {int((~np.isfinite(waveform)).sum())} "
                         "NaN or infinite ones")


def resample(waveform: np.ndarray, from_rate: int, to_rate: int, zeros: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """(N,) samples at `from_rate` -> (ceil(N * to_rate / from_rate),) at `to_rate`, low-passed below
    rolloff * the lower Nyquist rate by a Hann-windowed sinc `zeros` zero crossings wide."""
    if from_rate == to_rate:
        return waveform.astype(np.float32)
    g = math.gcd(from_rate, to_rate)
    up, down = to_rate // g, from_rate // g  # output phases per `down` input samples
    if max(up, down) > MAX_PHASES:  # the filter bank would hold up x (2 * width + down) taps
        raise InputError(f"audio at {from_rate} Hz cannot be resampled to {to_rate} Hz cheaply (the ratio reduces to "
                         f"{up}/{down}); resample it to a common rate (8, 16, 22.05, 24, 32, 44.1 or 48 kHz) first")
    cutoff = min(up, down) * rolloff
    width = math.ceil(zeros * down / cutoff)
    taps = np.arange(-width, width + down)[None, :] / down  # (1, K) input offsets, in input periods
    t = (taps - np.arange(up)[:, None] / up) * cutoff  # (up, K): distance from each output phase
    t = np.clip(t, -zeros, zeros)
    window = np.cos(t * math.pi / zeros / 2) ** 2
    kernels = np.sinc(t) * window * (cutoff / down)  # (up, K)
    n = len(waveform)
    padded = np.concatenate([np.zeros(width), waveform.astype(np.float64), np.zeros(width + down)])
    blocks = -(-n // down)  # one block of `up` outputs per `down` inputs
    frames = np.lib.stride_tricks.sliding_window_view(padded, kernels.shape[1])[: blocks * down: down]
    out = (frames @ kernels.T).reshape(-1)  # (blocks * up,)
    return out[: math.ceil(n * up / down)].astype(np.float32)
