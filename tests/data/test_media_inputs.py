"""Media files as users' tools write them, read by the entry points that take files (`polymodal generate`'s
`load_media`, the server's request parser): an image whose EXIF block is broken (Pillow raised SyntaxError or
struct.error reading it: a 500 on the server) shows its pixels as stored, as viewers show it; a 16-bit or float
TIFF whose 0 is white is not inverted; a damaged image file is the entry point's one-line error (Pillow raised
SyntaxError, RuntimeError or TypeError for some); a file PIL cannot identify is named by its kind; a float wav
whose samples pass full scale plays clipped (1e30 of them made NaN log-mel features)."""

import base64
import io

import numpy as np
import pytest
from hostile_media import float_wav, png_with_exif, tiff
from PIL import Image

from polymodal.data.documents import Audio, Document, Segment, load_media
from polymodal.errors import InputError
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.presets import get_preset
from polymodal.serve.protocol import ApiError, Limits, chat_job

PIXELS = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)  # (H, W, 3), not symmetric


def webp_with_exif(body: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(PIXELS).save(buffer, format="WEBP", lossless=True, exif=body)
    return buffer.getvalue()


BROKEN_EXIF = {
    "png-not-a-tiff-header": png_with_exif(Image.fromarray(PIXELS), b"garbage!garbage!"),  # SyntaxError
    "png-header-cut-short": png_with_exif(Image.fromarray(PIXELS), b"MM\x00*"),  # struct.error
    "webp-not-a-tiff-header": webp_with_exif(b"garbage!garbage!"),  # SyntaxError
}


def through(entry: str, data: bytes, tmp_path, suffix: str):
    """The file read by `polymodal generate`'s loader or by the server's request parser."""
    if entry == "cli":
        path = tmp_path / f"media.{suffix}"
        path.write_bytes(data)
        return load_media(path, "audio" if suffix == "wav" else "image")
    encoded = base64.b64encode(data).decode()
    part = ({"type": "input_audio", "input_audio": {"data": encoded, "format": "wav"}} if suffix == "wav" else
            {"type": "image_url", "image_url": {"url": f"data:image/{suffix};base64,{encoded}"}})
    body = {"model": "m", "messages": [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]}
    return chat_job(body, "m", Limits()).documents[0].segments[0].media


@pytest.mark.parametrize("entry", ["cli", "server"])
@pytest.mark.parametrize("case", BROKEN_EXIF)
def test_an_image_with_a_broken_exif_block_reads_as_stored(tmp_path, case, entry):
    with pytest.raises(Exception):  # the file is what the test says: Pillow cannot read its EXIF block
        Image.open(io.BytesIO(BROKEN_EXIF[case])).getexif()
    image = through(entry, BROKEN_EXIF[case], tmp_path, case.split("-")[0])
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), PIXELS)


def damaged(data: bytes):
    """Every file one byte from `data`: each byte set to 0x00, to 0xff or with its low bit flipped, and each cut."""
    for i in range(len(data)):
        for value in (0x00, 0xFF, data[i] ^ 1):
            yield data[:i] + bytes([value]) + data[i + 1:]
        yield data[:i]


@pytest.mark.parametrize("entry", ["cli", "server"])
@pytest.mark.parametrize("fmt", ["PNG", "AVIF", "TIFF"])
def test_a_damaged_image_is_an_image_or_the_entry_point_s_error(tmp_path, fmt, entry):
    """About 2,000 to 3,000 files per format, a second or two: a damaged AVIF raised RuntimeError or SyntaxError
    (about 450 of its 2,128), a PNG whose chunk after its pixels is broken SyntaxError, a TIFF TypeError."""
    buffer = io.BytesIO()
    Image.fromarray(PIXELS).save(buffer, format=fmt)
    for data in damaged(buffer.getvalue()):
        try:
            image = through(entry, data, tmp_path, fmt.lower())
        except (InputError, ApiError) as e:
            assert getattr(e, "status", 400) in (400, 413) and "\n" not in str(e)  # 413: a header past the limit
        else:
            assert image.mode == "RGB"


def test_an_image_file_pil_cannot_read_is_named_by_its_kind():
    """A float RGB TIFF (numpy tools write them; PIL reads float greyscale only) was "not a format the server reads
    (PNG, JPEG, GIF, BMP, WebP...)", beside data starting with the TIFF signature."""
    with pytest.raises(ApiError) as e:
        through("server", tiff((PIXELS / 255).astype(np.float32), photometric=2), None, "tiff")
    assert e.value.status == 400 and "a TIFF file PIL cannot read" in e.value.message


@pytest.mark.parametrize("entry", ["cli", "server"])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_a_white_is_zero_tiff_is_not_inverted(tmp_path, dtype, entry):
    """A TIFF whose photometric is WhiteIsZero (0 is white): PIL inverts its 8-bit samples, not its 16-bit or float
    ones, which came out as the photographic negative."""
    grey = PIXELS[..., 0]
    samples = (255 - grey).astype(np.uint16) * 257 if dtype is np.uint16 else ((255 - grey) / 255).astype(np.float32)
    image = through(entry, tiff(samples, photometric=0), tmp_path, "tiff")
    assert np.array_equal(np.asarray(image), np.repeat(grey[..., None], 3, -1))
    eight_bit = through(entry, tiff((255 - grey).astype(np.uint8), photometric=0), tmp_path, "tiff")
    assert np.array_equal(np.asarray(eight_bit), np.asarray(image))  # as PIL reads the 8-bit file


LOUD = np.tile(np.array([0.5, -0.25, 5.0, -5.0, 1e30, -1e30], np.float32), 500)  # 3000 samples, 0.19 s at 16 kHz


@pytest.fixture(scope="module")
def gemini_collator():
    tokenizer = Tokenizer.train(["a beep", "hello"], 300)
    return make_collator(fit_to_tokenizer(get_preset("gemini-tiny"), tokenizer), tokenizer)


@pytest.mark.parametrize("entry", ["cli", "server"])
def test_float_samples_past_full_scale_are_clipped_as_a_player_clips_them(tmp_path, gemini_collator, entry):
    clip = through(entry, float_wav(LOUD), tmp_path, "wav")
    clipped = np.clip(LOUD, -1, 1)
    assert clip.sample_rate == 16000 and np.array_equal(clip.waveform, clipped)
    features = gemini_collator([Document([Segment("audio", media=clip), Segment("text", "a beep")])])
    heard = gemini_collator([Document([Segment("audio", media=Audio(clipped, 16000)), Segment("text", "a beep")])])
    assert features["input_features"].isfinite().all()
    assert features["input_features"].equal(heard["input_features"])
