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
