"""Hostile sweep, media: images written by Pillow in every mode and format it saves, with EXIF orientations and
truncated files, and wav files at every common rate, bit depth and channel count, and broken ones, each read
through the three entry points that take files (training data `read_jsonl`, the CLI's `load_media`, the server's
request parser). A readable file must give what a user sees (the expected pixels are computed here from the
pattern written, not by polymodal's decoder); an unreadable one one line naming the file."""

import base64
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.data.documents import Audio, Document, DocumentError, Segment, load_media, read_jsonl
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import InputError
from polymodal.presets import get_preset
from polymodal.serve.protocol import ApiError, Limits, chat_job
from sweep_judge import judge

H, W = 12, 16
X = np.arange(W)[None, :].repeat(H, 0)
Y = np.arange(H)[:, None].repeat(W, 1)
RAMP = np.round(X * 255 / (W - 1)).astype(np.uint8)  # (H, W) grey 0 .. 255 left to right
COLOUR = np.stack([X * 17, Y * 20, np.full_like(X, 128)], -1).astype(np.uint8)  # (H, W, 3)
PALETTE = np.array([[200, 30, 40], [20, 180, 60], [30, 40, 220], [240, 220, 10]], np.uint8)
INDEX = ((X + Y) % 4).astype(np.uint8)
ALPHA = np.round(X * 255 / (W - 1)).astype(np.uint8)


def grey(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, -1)


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return np.round(rgb * a + 255 * (1 - a)).astype(np.uint8)


def palette_image(transparent: bool) -> Image.Image:
    im = Image.fromarray(INDEX, mode="P")
    im.putpalette(PALETTE.flatten().tolist())
    if transparent:
        im.info["transparency"] = 0
    return im


def pa_image() -> Image.Image:
    im = palette_image(False).convert("PA")
    im.putalpha(Image.fromarray(ALPHA, mode="L"))
    return im


def cmyk() -> tuple[Image.Image, np.ndarray]:
    c, m = (X * 12).astype(np.uint8), (Y * 15).astype(np.uint8)
    y, k = np.full_like(c, 50), np.full_like(c, 30)
    rgb = np.round(np.stack([(255 - v.astype(int)) * (255 - k.astype(int)) / 255 for v in (c, m, y)], -1))
    return Image.fromarray(np.stack([c, m, y, k], -1), mode="CMYK"), rgb


def wide(mode: str, values: np.ndarray) -> Image.Image:
    return Image.frombytes(mode, (W, H), values.astype({"I;16": "<u2", "I;16B": ">u2", "I": "<i4",
                                                        "F": "<f4"}[mode]).tobytes())


# (name, source image, expected RGB, formats, how far pixels may lie from it: mean abs over the image)
CMYK_IMAGE, CMYK_RGB = cmyk()
LOSSLESS = ("PNG", "TIFF", "BMP", "WEBP")
IMAGES = [
    ("1", Image.fromarray(RAMP > 127).convert("1"), grey(np.where(RAMP > 127, 255, 0)), ("PNG", "TIFF", "BMP", "GIF")),
    ("L", Image.fromarray(RAMP, mode="L"), grey(RAMP), ("PNG", "TIFF", "BMP", "GIF", "WEBP", "JPEG")),
    ("P", palette_image(False), PALETTE[INDEX], ("PNG", "TIFF", "GIF", "BMP")),
    ("P-transparent", palette_image(True), np.where((INDEX == 0)[..., None], 255, PALETTE[INDEX]), ("PNG", "GIF")),
    ("RGB", Image.fromarray(COLOUR), COLOUR, ("PNG", "TIFF", "BMP", "WEBP", "JPEG")),
    ("RGBA", Image.fromarray(np.dstack([COLOUR, ALPHA]), mode="RGBA"), on_white(COLOUR, ALPHA),
     ("PNG", "TIFF", "WEBP")),
    ("LA", Image.fromarray(np.dstack([RAMP, (Y * 23).astype(np.uint8)]), mode="LA"),
     on_white(grey(RAMP), (Y * 23).astype(np.uint8)), ("PNG", "TIFF")),
    ("PA", pa_image(), on_white(PALETTE[INDEX], ALPHA), ("TIFF",)),
    ("CMYK", CMYK_IMAGE, CMYK_RGB, ("TIFF", "JPEG")),
    ("YCbCr", Image.fromarray(COLOUR).convert("YCbCr"), COLOUR, ("TIFF", "JPEG")),  # 8-bit YCbCr: +-2 levels
    ("I;16 full-range ramp", wide("I;16", RAMP.astype(np.uint32) * 257), grey(RAMP), ("PNG", "TIFF")),
    ("I;16B", wide("I;16B", RAMP.astype(np.uint32) * 257), grey(RAMP), ("TIFF",)),
    ("I 16-bit values", wide("I", RAMP.astype(np.int64) * 257), grey(RAMP), ("TIFF",)),
    ("I past 16 bits", wide("I", RAMP.astype(np.int64) * 100_000 - 7_000_000), grey(RAMP), ("TIFF",)),
    ("F in 0..1", wide("F", RAMP / 255), grey(RAMP), ("TIFF",)),
    ("F past 0..1", wide("F", RAMP / 255 * 8 - 3), grey(RAMP), ("TIFF",)),
]


def encoded(image: Image.Image, fmt: str, **extra) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}), **extra)
    return buf.getvalue()


def through(entry: str, data: bytes, tmp_path, suffix: str = "img"):
    """The file's bytes read by one entry point: its media, or the entry point's error."""
    path = tmp_path / f"media.{suffix}"
    path.write_bytes(data)
    kind = "audio" if suffix == "wav" else "image"
    if entry == "training data":
        (tmp_path / "d.jsonl").write_text(json.dumps({"segments": [{kind: path.name}, {"text": "hi"}]}) + "\n")
        return read_jsonl(tmp_path / "d.jsonl")[0].segments[0].media
    if entry == "cli":
        return load_media(path, kind)
    part = ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}
            if kind == "image" else {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode()}})
    body = {"model": "m", "messages": [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]}
    return chat_job(body, "m", Limits()).documents[0].segments[0].media


ENTRIES = ("training data", "cli", "server")
ERRORS = {"training data": DocumentError, "cli": InputError, "server": ApiError}
TOLERANCE = {"JPEG": 12.0, "GIF": 1.0}  # mean abs difference; JPEG is lossy, GIF quantizes to 256 colours


def image_cases():
    for name, image, expected, formats in IMAGES:
        for fmt in formats:
            for entry in ENTRIES:
                yield pytest.param(image, expected, fmt, entry, id=f"result-{name}-{fmt}-{entry}")


@pytest.mark.parametrize("image, expected, fmt, entry", list(image_cases()))
def test_every_mode_decodes_as_a_user_sees_it(tmp_path, image, expected, fmt, entry):
    got = judge(lambda: through(entry, encoded(image, fmt), tmp_path), None)
    assert got.mode == "RGB" and got.size == (W, H)
    diff = np.abs(np.asarray(got, dtype=np.float64) - expected).mean()
    tolerance = TOLERANCE.get(fmt, 2.0 if image.mode == "YCbCr" else 0.5)
    assert diff <= tolerance, f"mean abs difference {diff:.2f} from the expected pixels"


def test_a_full_range_16_bit_ramp_stays_a_ramp(tmp_path):
    """The issue's example: a 16-bit PNG ramp was 99.6% pure white after convert("RGB")."""
    ramp = np.arange(256 * 4).reshape(4, 256) % 256 * 257
    data = encoded(wide_image := Image.fromarray(ramp.astype(np.uint16)), "PNG")
    assert wide_image.mode == "I;16" and (np.asarray(wide_image.convert("RGB")) == 255).mean() > 0.99
    got = np.asarray(through("cli", data, tmp_path))[..., 0]
    assert (np.diff(got[0].astype(int)) == 1).all() and got.min() == 0 and got.max() == 255


ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}


@pytest.mark.parametrize("orientation, fmt, entry", [
    pytest.param(o, f, e, id=f"result-exif-orientation-{o}-{f}-{e}") for o in range(1, 9) for f in ("JPEG", "PNG")
    for e in ENTRIES])
def test_exif_orientation_is_applied(tmp_path, orientation, fmt, entry):
    image = Image.fromarray(COLOUR)
    exif = image.getexif()
    exif[0x0112] = orientation
    got = judge(lambda: through(entry, encoded(image, fmt, exif=exif.tobytes()), tmp_path), None)
    expected = image.transpose(ORIENTATION[orientation]) if orientation in ORIENTATION else image
    assert got.size == expected.size
    assert np.abs(np.asarray(got, np.float64) - np.asarray(expected)).mean() <= TOLERANCE.get(fmt, 0.5)


@pytest.mark.parametrize("fmt, cut, entry", [
    pytest.param(f, c, e, id=f"{ERRORS[e].__name__}-truncated-{f}-at-{c}-{e}")
    for f in ("PNG", "JPEG", "GIF", "TIFF", "WEBP", "BMP") for c in (0, 8, 0.5, 0.9) for e in ENTRIES])
def test_truncated_images_are_named(tmp_path, fmt, cut, entry):
    data = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)), fmt)
    data = data[:int(len(data) * cut) if isinstance(cut, float) else cut]
    message = judge(lambda: through(entry, data, tmp_path), ERRORS[entry]) if entry != "server" else None
    if entry == "server":  # the server's error is an HTTP answer, not an exception (tests/serve for the live one)
        with pytest.raises(ApiError) as info:
            through(entry, data, tmp_path)
        assert info.value.status == 400 and "is not a decodable image" in str(info.value)
    else:
        assert "media.img" in message


@pytest.mark.parametrize("entry", [pytest.param(e, id=f"{ERRORS[e].__name__}-float-image-with-nan-{e}")
                                   for e in ("training data", "cli")])
def test_a_float_image_with_nan_pixels_is_refused(tmp_path, entry):
    data = encoded(wide("F", np.where(X > 3, RAMP / 255, np.nan)), "TIFF")
    judge(lambda: through(entry, data, tmp_path), ERRORS[entry], "NaN or infinite pixels")


# ---------------------------------------------------------------------------------------------
# audio

def wav(samples: np.ndarray, rate: int, encoding: str, extensible: bool = False) -> bytes:
    """A RIFF/WAVE file written here, byte by byte (not by polymodal): samples (N, channels) in [-1, 1]."""
    n, channels = samples.shape
    if encoding == "u8":
        raw, tag, bits = np.round(samples * 127 + 128).astype(np.uint8).tobytes(), 1, 8
    elif encoding in ("s16", "s32"):
        bits = int(encoding[1:])
        raw, tag = np.round(samples * (2 ** (bits - 1) - 1)).astype(f"<i{bits // 8}").tobytes(), 1
    elif encoding == "s24":
        v = np.round(samples * (2 ** 23 - 1)).astype("<i4").reshape(-1)
        raw, tag, bits = np.stack([v & 255, (v >> 8) & 255, (v >> 16) & 255], -1).astype(np.uint8).tobytes(), 1, 24
    else:
        bits = int(encoding[1:])
        raw, tag = samples.astype(f"<f{bits // 8}").tobytes(), 3
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * align, align, bits)
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x008\x9bq"  # KSDATAFORMAT_SUBTYPE_* after the tag
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + guid_tail
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(raw)) + raw
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def tone(rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.stack([0.5 * np.sin(2 * np.pi * 440 * t) * (1 - 0.3 * c) for c in range(channels)], -1)


QUANTUM = {"u8": 1 / 127, "s16": 1 / 32767, "s24": 2 ** -23, "s32": 2 ** -31, "f32": 1e-7, "f64": 1e-12}
RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)


@pytest.mark.parametrize("rate, encoding, channels, entry", [
    pytest.param(r, e, c, en, id=f"result-wav-{r}Hz-{e}-{c}ch-{en}") for r in RATES for e in QUANTUM for c in (1, 2)
    for en in (("training data", "cli", "server") if (r, c) in ((22050, 2), (44100, 1)) else ("training data",))])
def test_wavs_of_every_common_layout_are_read(tmp_path, rate, encoding, channels, entry):
    samples = tone(rate, 0.25, channels)
    got = judge(lambda: through(entry, wav(samples, rate, encoding, extensible=channels == 2), tmp_path, "wav"), None)
    assert got.sample_rate == rate and got.waveform.shape == (len(samples),)
    assert np.abs(got.waveform - samples.mean(1)).max() <= 1.5 * QUANTUM[encoding] + 1e-7


@pytest.fixture(scope="module")
def gemini_collator():
    tokenizer = Tokenizer.train(["a beep", "hello"], 300)
    return make_collator(fit_to_tokenizer(get_preset("gemini-tiny"), tokenizer), tokenizer)  # a 16 kHz, 1 s audio window


@pytest.mark.parametrize("rate", [pytest.param(r, id=f"result-resampled-from-{r}Hz") for r in RATES + (96000,)])
def test_audio_at_any_rate_gives_the_features_of_the_16khz_clip(gemini_collator, rate):
    features = judge(lambda: gemini_collator([Document([Segment("audio", media=Audio(
        tone(rate, 0.5)[:, 0].astype(np.float32), rate)), Segment("text", "a beep")])])["input_features"], None)
    reference = gemini_collator([Document([Segment("audio", media=Audio(tone(16000, 0.5)[:, 0].astype(np.float32),
                                                                         16000)), Segment("text", "a beep")])])
    assert (features - reference["input_features"]).abs().mean() < 0.01


def test_the_issue_example_a_074_s_clip_at_22050_hz_is_heard(gemini_collator):
    """0.74 s at 22.05 kHz: 16,317 samples, more than the window's 16,000 at 16 kHz, but 0.74 s of sound."""
    clip = Audio(tone(22050, 0.74)[:, 0].astype(np.float32), 22050)
    batch = gemini_collator([Document([Segment("audio", media=clip), Segment("text", "a beep")])])
    assert batch["input_features"].shape[0] == 1 and batch["input_features"].isfinite().all()
    with pytest.raises(DocumentError, match=r"audio clip of 1.5 s \(at 22050 Hz\); the audio encoder hears at most 1 s"):
        gemini_collator([Document([Segment("audio", media=Audio(tone(22050, 1.5)[:, 0].astype(np.float32), 22050)),
                                   Segment("text", "a beep")])])


def broken_wavs() -> dict[str, tuple[bytes, str]]:
    good = wav(tone(16000, 0.1), 16000, "s16")
    fmt_at = good.index(b"fmt ") + 8

    def with_fmt(tag=1, channels=1, rate=16000, bits=16):
        return good[:fmt_at] + struct.pack("<HHIIHH", tag, channels, rate, rate * 2, 2, bits) + good[fmt_at + 16:]

    nan = tone(16000, 0.1).astype(np.float32)
    nan[5] = np.nan
    inf = tone(16000, 0.1).astype(np.float32)
    inf[7] = -np.inf
    return {
        "empty file": (b"", "not a RIFF/WAVE file"),
        "not riff": (b"ID3\x03" + good[4:], "not a RIFF/WAVE file"),
        "png bytes": (encoded(Image.fromarray(COLOUR), "PNG"), "not a RIFF/WAVE file"),
        "no fmt chunk": (good[:12] + good[good.index(b"data"):], "no format chunk"),
        "no data chunk": (good[:good.index(b"data")], "no data chunk"),
        "mu-law": (with_fmt(tag=7, bits=8), "mu-law-encoded samples"),
        "a-law": (with_fmt(tag=6, bits=8), "A-law-encoded samples"),
        "adpcm": (with_fmt(tag=2, bits=4), "ADPCM-encoded samples"),
        "mp3 in wav": (with_fmt(tag=0x55), "MP3-encoded samples"),
        "unknown tag": (with_fmt(tag=0x1234), "format tag 4660"),
        "12-bit pcm": (with_fmt(bits=12), "12-bit PCM samples"),
        "16-bit float": (with_fmt(tag=3, bits=16), "16-bit IEEE float samples"),
        "zero channels": (with_fmt(channels=0), "in 0 channel(s)"),
        "zero rate": (with_fmt(rate=0), "at 0 Hz"),
        "nan samples": (wav(nan, 16000, "f32"), "1 samples are NaN or infinite"),
        "inf samples": (wav(inf, 16000, "f32"), "1 samples are NaN or infinite"),
        "truncated header": (good[:20], "no format chunk"),
    }


BROKEN = broken_wavs()


@pytest.mark.parametrize("case, entry", [pytest.param(c, e, id=f"{ERRORS[e].__name__}-wav-{c}-{e}")
                                         for c in BROKEN for e in ENTRIES])
def test_broken_wavs_are_refused_for_their_real_cause(tmp_path, case, entry):
    data, cause = BROKEN[case]
    if entry == "server":
        with pytest.raises(ApiError) as info:
            through(entry, data, tmp_path, "wav")
        assert info.value.status == 400 and cause in str(info.value)
        return
    message = judge(lambda: through(entry, data, tmp_path, "wav"), ERRORS[entry], cause)
    assert "media.wav" in message


@pytest.mark.parametrize("waveform, rate, match", [
    pytest.param(np.array([0.1, np.nan], np.float32), 16000, "NaN or infinite", id="InputError-api-audio-nan"),
    pytest.param(np.array([np.inf, 0.0], np.float32), 16000, "NaN or infinite", id="InputError-api-audio-inf"),
    pytest.param(np.zeros(100, np.int16), 16000, "1-D float numpy waveform", id="InputError-api-audio-int16"),
    pytest.param(np.zeros((100, 2), np.float32), 16000, "1-D float numpy waveform", id="InputError-api-audio-stereo-2d"),
    pytest.param(np.zeros(100, np.float32), 0, "positive integer", id="InputError-api-audio-rate-0"),
    pytest.param(np.zeros(100, np.float32), 22050.5, "positive integer", id="InputError-api-audio-rate-float"),
    pytest.param(np.zeros(100, np.float32), -16000, "positive integer", id="InputError-api-audio-rate-negative"),
    pytest.param(np.zeros(100, np.float32), 16001, "cannot be resampled", id="InputError-api-audio-rate-prime"),
    pytest.param([0.0] * 100, 16000, "1-D float numpy waveform", id="InputError-api-audio-list"),
])
def test_audio_given_in_python_is_checked(gemini_collator, waveform, rate, match):
    doc = Document([Segment("audio", media=Audio(waveform, rate)), Segment("text", "a beep")])
    judge(lambda: gemini_collator([doc]), InputError, match)
