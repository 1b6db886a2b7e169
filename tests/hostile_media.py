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


def float_rgb_tiff(pixels: np.ndarray) -> bytes:
    """A TIFF of 32-bit float RGB samples (H, W, 3), as numpy tools write it (uncompressed, one strip): a layout
    PIL does not decode."""
    h, w, _ = pixels.shape
    data = pixels.astype("<f4").tobytes()
    n = 10  # IFD entries; after the IFD: BitsPerSample and SampleFormat (3 shorts each), then the samples
    extra = 8 + 2 + 12 * n + 4
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, extra), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, extra + 12), (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, len(data)), (339, 3, 3, extra + 6)]
    ifd = struct.pack("<H", n) + b"".join(struct.pack("<HHII", tag, kind, count, value)
                                          for tag, kind, count, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4 + struct.pack("<6H", 32, 32, 32, 3, 3, 3) + data
