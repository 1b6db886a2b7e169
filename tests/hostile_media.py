"""Media files written byte by byte as users' tools write them, broken or extreme, for the tests of what the entry
points that read media make of them (tests/data/test_media_inputs.py, tests/serve/test_hostile_inputs.py)."""

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_with_exif(image: Image.Image, body: bytes) -> bytes:
    """`image` as a PNG with an eXIf chunk holding `body`, put before its image data."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    png = buffer.getvalue()
    at = png.index(b"IDAT") - 4
    return png[:at] + struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body)) \
        + png[at:]


def float_wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    """A mono 32-bit IEEE float RIFF/WAVE file of `samples` (N,), as they are (past full scale too)."""
    raw = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(raw)) + raw
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def tiff(pixels: np.ndarray, photometric: int) -> bytes:
    """An uncompressed one-strip little-endian TIFF of `pixels` (H, W) or (H, W, C), its samples of their dtype
    (unsigned, signed or float), as numpy tools write it; photometric 0: WhiteIsZero, 1: BlackIsZero, 2: RGB."""
    h, w = pixels.shape[:2]
    c = 1 if pixels.ndim == 2 else pixels.shape[2]
    data = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    bits, sample_format = pixels.dtype.itemsize * 8, {"u": 1, "i": 2, "f": 3}[pixels.dtype.kind]
    n = 10  # IFD entries; after the IFD: BitsPerSample and SampleFormat (c shorts each, padded to 4), the samples
    extra = 8 + 2 + 12 * n + 4
    per_sample = 2 * c + 2 * c % 4
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, c, extra if c > 1 else bits), (259, 3, 1, 1),
               (262, 3, 1, photometric), (273, 4, 1, extra + 2 * per_sample), (277, 3, 1, c), (278, 4, 1, h),
               (279, 4, 1, len(data)), (339, 3, c, extra + per_sample if c > 1 else sample_format)]
    ifd = struct.pack("<H", n) + b"".join(struct.pack("<HHII", tag, kind, count, value)
                                          for tag, kind, count, value in entries)
    shorts = b"".join(struct.pack(f"<{c}H", *[v] * c).ljust(per_sample, b"\x00") for v in (bits, sample_format))
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4 + shorts + data
