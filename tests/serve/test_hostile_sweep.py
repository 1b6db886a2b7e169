"""Hostile sweep, server: raw HTTP bodies to a live `polymodal serve` (the session's server, tests/serve/conftest.py):
non-finite, mis-typed and out-of-range numbers (NaN and Infinity are JSON to Python's parser), malformed bodies and
messages, media in every PIL mode and wavs at other rates, lone surrogates. Each probe gets the status it should (200
with an answer, or an OpenAI-style error with a one-line message), within the client's timeout, and the server stays
healthy. The counts per outcome are printed when tests/sweep runs in the same session."""

import base64
import io
import json
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import WORLD, call
from PIL import Image

NAN, INF = float("nan"), float("inf")


def body(**fields) -> bytes:
    """A chat request with `fields` changed (None: left out); json.dumps writes NaN and Infinity as Python's parser
    reads them."""
    request = {"model": "gemini-tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **fields}
    return json.dumps({k: v for k, v in request.items() if v is not None}).encode()


def parts(*content) -> bytes:
    return body(messages=[{"role": "user", "content": [*content, {"type": "text", "text": "what is it?"}]}])


def image_part(image: Image.Image, fmt: str = "PNG", **save) -> dict:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return {"type": "image_url", "image_url": {"url": f"data:image/{fmt.lower()};base64,"
                                                      + base64.b64encode(buf.getvalue()).decode()}}


def wav(samples: np.ndarray, rate: int, tag: int = 1, bits: int = 16, channels: int = 1) -> bytes:
    raw = (np.round(samples * 32767).astype("<i2") if tag == 1 else samples.astype(f"<f{bits // 8}")).tobytes()
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    chunks = b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(raw)) + raw
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def audio_part(data: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}


def tone(rate: int, seconds: float) -> np.ndarray:
    return (0.4 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


RANGES = {  # field: (low, high, kind), kind "integer", "number" or "boolean" (whose bounds are unused)
    "temperature": (0, 2, "number"), "top_p": (0, 1, "number"), "max_tokens": (1, 1 << 20, "integer"),
    "max_completion_tokens": (1, 1 << 20, "integer"), "n": (1, 16, "integer"),
    "seed": (-(1 << 63), (1 << 63) - 1, "integer"), "top_k": (0, 1 << 20, "integer"),
    "repetition_penalty": (0.01, 100, "number"), "frequency_penalty": (-2, 2, "number"),
    "presence_penalty": (-2, 2, "number"), "logprobs": (None, None, "boolean"), "top_logprobs": (0, 20, "integer"),
}
BESIDE = {"top_logprobs": {"logprobs": True},  # what a field needs beside it to be read
          "max_completion_tokens": {"max_tokens": None}}  # (a request gives max_tokens or it, not both)
VALUES = [NAN, INF, -INF, 1e309, -1, 0, 1, 1.5, 2, 17, 1 << 70, "1", True, [], {}]
EDGES = {  # beside VALUES, each field's bounds and just past them (top_k: 0 is off, -1 is refused, not vLLM's off)
    "repetition_penalty": [0.01, 0.005, 100, 100.5], "top_logprobs": [20, 21],
    "frequency_penalty": [2.0, 2.5, -2.0, -2.5], "presence_penalty": [2.0, 2.5, -2.0, -2.5],
    "top_k": [1 << 20, (1 << 20) + 1], "temperature": [2.0, 2.5], "top_p": [1.0, 1.01],
}


def expected_status(field: str, value) -> int:
    low, high, kind = RANGES[field]
    if kind == "boolean":
        return 200 if isinstance(value, bool) else 400
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and (kind == "number" or isinstance(value, int)) and low <= value <= high
    if ok and field in ("max_tokens", "max_completion_tokens") and value > 500:
        return 400  # past the model's context of 512 tokens
    return 200 if ok else 400


def number_probes():
    for field in RANGES:
        seen = set(map(repr, VALUES))  # 2.0 is another JSON number than 2
        for value in VALUES + [v for v in EDGES.get(field, []) if repr(v) not in seen]:
            status = expected_status(field, value)
            yield pytest.param(body(**{**BESIDE.get(field, {}), field: value}), status,
                               field if status == 400 else None,
                               id=f"{'ApiError' if status == 400 else 'result'}-{status}-{field}={value!r}")


RAMP16 = Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 32 * 2114).astype(np.uint16))
EXIF = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
ROTATED = EXIF.getexif()
ROTATED[0x0112] = 6  # stored on its side
NAN_WAV = tone(16000, 0.2)
NAN_WAV[9] = NAN
OTHER = {  # name: (body, status, param or None)
    "empty body": (b"", 400, None),
    "null": (b"null", 400, None),
    "a number": (b"1", 400, None),
    "a string": (b'"hi"', 400, None),
    "invalid utf-8": (b'{"model": "\xff\xfe"}', 400, None),
    "nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000, 400, None),
    "a 5 MB message": (body(messages=[{"role": "user", "content": "red " * 1_300_000}]), 400, "messages"),
    "a 5 MB word": (body(messages=[{"role": "user", "content": "r" * 5_000_000}]), 400, "messages"),
    "a body over the 24 MiB cap": (body(messages=[{"role": "user", "content": "r" * (25 << 20)}]), 413, None),
    "lone surrogate": (body(messages=[{"role": "user", "content": "bad \ud800 text"}]), 400, "messages[0].content"),
    "lone surrogate in a part": (parts({"type": "text", "text": "\udfff"}), 400, "messages[0].content[0].text"),
    "content a number": (body(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    "content empty list": (body(messages=[{"role": "user", "content": []}]), 400, "messages[0].content"),
    "content null": (body(messages=[{"role": "user", "content": None}]), 400, "messages[0].content"),
    "part without type": (parts({"text": "x"}), 400, "messages[0].content[0]"),
    "part of unknown type": (parts({"type": "video_url", "video_url": "x"}), 400, "messages[0].content[0]"),
    "part a string": (parts("x"), 400, "messages[0].content[0]"),
    "message a string": (body(messages=["hello"]), 400, "messages[0].role"),
    "role null": (body(messages=[{"role": None, "content": "x"}]), 400, "messages[0].role"),
    "messages an object": (body(messages={"role": "user"}), 400, "messages"),
    "model a number": (body(model=3), 400, "model"),
    "stream a string": (body(stream="yes"), 400, "stream"),
    "stop a number": (body(stop=5), 400, "stop"),
    "stop empty string": (body(stop=""), 400, "stop"),
    "stop list of numbers": (body(stop=[1, 2]), 400, "stop"),
    "stream_options list": (body(stream_options=[1]), 400, "stream_options"),
    "image url a number": (parts({"type": "image_url", "image_url": {"url": 5}}), 400, "messages[0].content[0].image_url"),
    "image data not base64": (parts({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}), 400,
                              "messages[0].content[0].image_url"),
    "image of text bytes": (parts({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                            + base64.b64encode(b"x" * 99).decode()}}),
                            400, "messages[0].content[0].image_url"),
    "image a file url": (parts({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}), 400,
                         "messages[0].content[0].image_url"),
    "audio mp3 format": (parts({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}), 400,
                         "messages[0].content[0].input_audio"),
    "audio data a number": (parts({"type": "input_audio", "input_audio": {"data": 5}}), 400,
                            "messages[0].content[0].input_audio"),
    "audio nan float wav": (parts(audio_part(wav(NAN_WAV, 16000, tag=3, bits=32))), 400,
                            "messages[0].content[0].input_audio"),
    "audio mu-law": (parts(audio_part(wav(tone(8000, 0.2), 8000)[:20] + struct.pack("<H", 7)
                                      + wav(tone(8000, 0.2), 8000)[22:])), 400, "messages[0].content[0].input_audio"),
    "audio 1.5 s at 22.05 kHz": (parts(audio_part(wav(tone(22050, 1.5), 22050))), 400, "messages"),
    "audio 0.74 s at 22.05 kHz": (parts(audio_part(wav(tone(22050, 0.74), 22050))), 200, None),
    "audio stereo float64 at 48 kHz": (parts(audio_part(wav(np.repeat(tone(48000, 0.3), 2), 48000, tag=3, bits=64,
                                                            channels=2))), 200, None),
    "audio 8-bit at 8 kHz": (parts(audio_part(
        wav(tone(8000, 0.3), 8000)[:34] + struct.pack("<H", 8) + wav(tone(8000, 0.3), 8000)[36:])), 200, None),
    "image 16-bit png": (parts(image_part(RAMP16)), 200, None),
    "image 16-bit tiff": (parts(image_part(RAMP16, "TIFF")), 200, None),
    "image float tiff": (parts(image_part(Image.fromarray(np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30)),
                                          "TIFF")), 200, None),
    "image float tiff with nan": (parts(image_part(Image.fromarray(np.full((20, 30), NAN, np.float32)), "TIFF")), 400,
                                  "messages[0].content[0].image_url"),
    "image cmyk jpeg": (parts(image_part(Image.new("CMYK", (30, 20), (0, 200, 200, 0)), "JPEG")), 200, None),
    "image rgba png": (parts(image_part(Image.new("RGBA", (30, 20), (255, 0, 0, 90)))), 200, None),
    "image la png": (parts(image_part(Image.new("LA", (30, 20), (100, 50)))), 200, None),
    "image palette gif": (parts(image_part(WORLD.draw("red", "circle").convert("P"), "GIF")), 200, None),
    "image 1-bit bmp": (parts(image_part(Image.new("1", (30, 20), 1), "BMP")), 200, None),
    "image exif rotated jpeg": (parts(image_part(EXIF, "JPEG", exif=ROTATED.tobytes())), 200, None),
    "image truncated png": (parts({"type": "image_url", "image_url": {"url": image_part(WORLD.draw("red", "circle"))[
        "image_url"]["url"][:120]}}), 400, "messages[0].content[0].image_url"),
}


def other_probes():
    for name, (data, status, param) in OTHER.items():
        yield pytest.param(data, status, param, id=f"{'ApiError' if status != 200 else 'result'}-{status}-{name}")


def completions(prompt) -> bytes:
    return json.dumps({"model": "gemini-tiny", "prompt": prompt, "max_tokens": 2}).encode()


COMPLETIONS = {"prompt a number": (5, 400, "prompt"), "prompt list of numbers": ([1, 2], 400, "prompt"),
               "prompt empty list": ([], 400, "prompt"), "prompt null": (None, 400, "prompt"),
               "prompt lone surrogate": ("a\ud800", 400, "prompt[0]"),
               "prompt list with a lone surrogate": (["ok", "\udc80"], 400, "prompt[1]"),
               "prompt two strings": (["a", "b"], 200, None), "prompt control tokens": ("<image><eos><pad>", 200, None),
               "prompt NUL": ("a\x00b", 200, None)}


@pytest.mark.parametrize("data, status, param", [*number_probes(), *other_probes()])
def test_chat_probe(live, data, status, param):
    check(live, "/v1/chat/completions", data, status, param)


@pytest.mark.parametrize("name", [pytest.param(n, id=f"{'result' if s == 200 else 'ApiError'}-{s}-completions-{n}")
                                  for n, (_, s, _) in COMPLETIONS.items()])
def test_completions_probe(live, name):
    prompt, status, param = COMPLETIONS[name]
    check(live, "/v1/completions", completions(prompt), status, param)


def check(live, path: str, data: bytes, status: int, param: str | None) -> None:
    got, answer = call(live.url + path, data)
    assert got == status, answer
    if status == 200:
        assert answer["choices"] and all(c["finish_reason"] in ("stop", "length") for c in answer["choices"])
    else:
        message = answer["error"]["message"]
        assert message and "\n" not in message and "Traceback" not in message, answer
        assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param, answer
    assert "running" in live.health()  # still up after every probe


@pytest.mark.parametrize("method, path, status", [
    pytest.param("GET", "/v1/chat/completions", 405, id="result-405-GET-chat"),
    pytest.param("POST", "/v1/nothing", 404, id="result-404-unknown-path"),
    pytest.param("GET", "/v1/models/../../etc/passwd", 404, id="result-404-dotdot-path")])
def test_wrong_methods_and_paths(live, method, path, status):
    request = urllib.request.Request(live.url + path, data=b"{}" if method == "POST" else None, method=method)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == status
