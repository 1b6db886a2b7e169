"""OpenAI API request bodies -> polymodal documents and sampling settings, checked before any compute.

Chat messages become one `Document` (each message's parts, in order, as segments; the whole
conversation is the prompt), completions one text segment: `Collator.prompts` then lays it out as
training does, so the server answers exactly as `polymodal generate`. Media come only inline: an
`image_url` must be a `data:` URI (the server never fetches from the network), `input_audio` base64
16-bit mono wav. Every mistake is an `ApiError` with the HTTP status, the field and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from polymodal.data.documents import Document, Segment, read_wav
from polymodal.data.media import TooLarge, open_image
from polymodal.errors import InputError, check_text
from polymodal.generation.batching import MAX_TOP_LOGPROBS

ROLES = ("system", "developer", "user", "assistant")
_SIGNATURES = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
               b"BM": "BMP"}  # the first bytes of image files, to name the kind of one PIL cannot read
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_N = 16


class ApiError(Exception):
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 24 << 20  # the whole request body, refused (413) before it is read in full or parsed
    max_image_bytes: int = 8 << 20  # decoded size of one image or audio clip
    max_image_pixels: int = 4096 * 4096
    max_media: int = 8  # images and audio clips in one request


@dataclass
class Sampling:
    max_tokens: int | None  # None: up to the context
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool
    top_k: int | None = None  # None: every token
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely ones'


@dataclass
class Job:
    model: str
    documents: list[Document]  # one per prompt (chat: one)
    sampling: Sampling
    field: str = "messages"  # the request field that holds the documents, named in errors about them


COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options",
          "user", "frequency_penalty", "presence_penalty", "logprobs", "top_k", "repetition_penalty"}
CHAT = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETIONS = COMMON | {"prompt"}


def _type_name(x: Any) -> str:
    return "null" if x is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(x),
                                                                                                      type(x).__name__)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    # ValueError: JSONDecodeError, UnicodeDecodeError, or an integer of over 4300 digits (Python's limit);
    # RecursionError: [[[[...]]]] nested deep
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    return body


def _number(body: dict, name: str, default, low: float, high: float, *, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{name} must be {kind} in [{low}, {high}], got {json.dumps(value)}", name)
    return value


def _logprobs(body: dict, chat: bool) -> int | None:
    """The most likely tokens to list beside each token's log-probability, None for no log-probabilities. Chat:
    logprobs true/false and top_logprobs 0..20; completions: logprobs 0..20 (OpenAI lists up to 5)."""
    if not chat:
        return _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise ApiError(400, f"logprobs must be a boolean, got {json.dumps(wanted)}", "logprobs")
    top = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None


def sampling(body: dict, allowed: set[str], *, chat: bool) -> Sampling:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; this server reads {', '.join(sorted(allowed))}",
                       unknown[0])
    if "max_completion_tokens" in body and "max_tokens" in body:
        raise ApiError(400, "give max_completion_tokens or max_tokens, not both", "max_completion_tokens")
    limit = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP} of them, got "
                            f"{json.dumps(body.get('stop'))}", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, f"stream must be a boolean, got {json.dumps(stream)}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, f"stream_options must be an object with include_usage only, got {json.dumps(options)}",
                       "stream_options")
    return Sampling(max_tokens=_number(body, limit, None, 1, 1 << 20, integer=True),
                    temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                    top_p=float(_number(body, "top_p", 1.0, 0, 1)) or 1e-9,  # 0: the most likely token alone
                    seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
                    stop=tuple(stop), n=_number(body, "n", 1, 1, MAX_N, integer=True), stream=bool(stream),
                    include_usage=bool(options.get("include_usage", True)),
                    top_k=_number(body, "top_k", 0, 0, 1 << 20, integer=True) or None,  # 0: off, as vLLM
                    repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0.01, 100)),
                    frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2, 2)),
                    presence_penalty=float(_number(body, "presence_penalty", 0.0, -2, 2)),
                    logprobs=_logprobs(body, chat))


def _model(body: dict, served: str) -> str:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, f"model must be a string naming the served model ({served!r}), got "
                            f"{json.dumps(model)}", "model")
    if model != served:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served!r}", "model",
                       "model_not_found")
    return model


def _base64(data: str, where: str, limits: Limits) -> bytes:
    if len(data) > (limits.max_image_bytes + 2) // 3 * 4 + 4:
        raise ApiError(413, f"{where} is over the limit of {limits.max_image_bytes} bytes "
                            f"(about {len(data) * 3 // 4} bytes given)", where)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{where} is not valid base64 ({e})", where) from e


def _image(part: dict, where: str, limits: Limits) -> Image.Image:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise ApiError(400, f"{where}.image_url must be an object with a url string, got {json.dumps(spec)}",
                       f"{where}.image_url")
    return data_image(url, f"{where}.image_url", limits)


def data_image(url: str, where: str, limits: Limits) -> Image.Image:
    """The image of a `data:image/<type>;base64,<data>` URL; `where` names it in errors."""
    head, comma, data = url.partition(",")
    if not url.startswith("data:"):
        raise ApiError(400, f"{where}.url must be a data: URI (data:image/png;base64,...); the server never "
                            f"fetches from the network, got {url[:60]!r}", where)
    if not comma or not head.endswith(";base64") or not head[5:].startswith("image/"):
        raise ApiError(400, f"{where}.url must be data:image/<type>;base64,<data>, got {head[:60]!r}", where)
    raw = _base64(data, where, limits)
    try:
        return open_image(raw, limits.max_image_pixels)
    except TooLarge as e:
        raise ApiError(413, f"{where} is {e.width}x{e.height} pixels, over the limit of "
                            f"{limits.max_image_pixels} pixels", where) from e
    except UnidentifiedImageError as e:  # its message names a Python object (<_io.BytesIO object at 0x...>)
        kind = next((name for magic, name in _SIGNATURES.items() if raw.startswith(magic)), None)
        what = (f"a {kind} file PIL cannot read (damaged, or a layout PIL does not decode, such as a float RGB TIFF)"
                if kind else "not a format the server reads (PNG, JPEG, GIF, BMP, WebP...)")
        raise ApiError(400, f"{where} is not a decodable image: {what}; its data starts with {raw[:8]!r}", where) from e
    except (OSError, EOFError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"{where} is not a decodable image ({e})", where) from e


def _audio(part: dict, where: str, limits: Limits):
    spec = part.get("input_audio")
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
        raise ApiError(400, f"{where}.input_audio must be an object with base64 data, got {json.dumps(spec)[:80]}",
                       f"{where}.input_audio")
    if spec.get("format", "wav") != "wav":
        raise ApiError(400, f"{where}.input_audio.format must be 'wav', got {json.dumps(spec.get('format'))}",
                       f"{where}.input_audio")
    try:
        return read_wav(io.BytesIO(_base64(spec["data"], f"{where}.input_audio", limits)))
    except (EOFError, ValueError) as e:
        raise ApiError(400, f"{where}.input_audio is not a wav file of PCM or float samples ({e})",
                       f"{where}.input_audio") from e


def _text(text: str, where: str) -> Segment:
    try:
        return Segment("text", check_text(text, where))
    except InputError as e:
        raise ApiError(400, str(e), where) from e


def _segments(content: Any, where: str, limits: Limits) -> list[Segment]:
    if isinstance(content, str):
        return [_text(content, f"{where}.content")]
    if not isinstance(content, list) or not content:
        raise ApiError(400, f"{where}.content must be a string or a non-empty array of parts, got "
                            f"{_type_name(content)}", f"{where}.content")
    out = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(_text(part["text"], f"{at}.text"))
        elif kind == "image_url":
            out.append(Segment("image", media=_image(part, at, limits)))
        elif kind == "input_audio":
            out.append(Segment("audio", media=_audio(part, at, limits)))
        else:
            raise ApiError(400, f"{at} must be a text, image_url or input_audio part, got {json.dumps(part)[:80]}", at)
    return out


def _answers(settings: Sampling, prompts: int, max_answers: int | None, field: str) -> None:
    """A 400 before any prompt is read when the request asks for more answers (its prompts times n) than the server
    queues: a full queue's 429 would be retried, and never fit."""
    if max_answers is not None and prompts * settings.n > max_answers:
        raise ApiError(400, f"the request asks for {prompts * settings.n} answers ({prompts} prompts times "
                            f"n={settings.n}); the most this server queues is {max_answers} (polymodal serve "
                            "--max-queue)", "n" if settings.n > 1 else field)


def _count_parts(messages: list, limits: Limits, context: int | None) -> None:
    """A 400 before any part is read (20000 one-pixel images took seconds to decode, 700000 empty messages to lay
    out) when the messages hold more images and audio clips than the limit, or as many parts as the context: every
    part lays out as a token at least (a text is followed by its separator), beside <bos>."""
    parts = media = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        content = content if isinstance(content, list) else [content]
        parts += len(content)
        media += sum(isinstance(p, dict) and p.get("type") in ("image_url", "input_audio") for p in content)
    if media > limits.max_media:
        raise ApiError(400, f"the request has {media} images and audio clips; the limit is {limits.max_media}",
                       "messages")
    if context is not None and parts >= context:
        raise ApiError(400, f"the messages have {parts} parts (texts, images, audio clips), each a token at least: "
                            f"past the model's context of {context} tokens", "messages", "context_length_exceeded")


def chat_job(body: dict, served: str, limits: Limits, max_answers: int | None = None,
             context: int | None = None) -> Job:
    """max_answers: the most answers the server queues; context: the model's, in tokens (both checked before the
    messages are read)."""
    settings = sampling(body, CHAT, chat=True)
    model = _model(body, served)
    _answers(settings, 1, max_answers, "messages")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"messages must be a non-empty array, got {_type_name(messages)}", "messages")
    _count_parts(messages, limits, context)
    segments = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}",
                           f"{where}.role")
        segments += _segments(message.get("content"), where, limits)
    return Job(model, [Document(segments)], settings)


def completion_job(body: dict, served: str, limits: Limits, max_answers: int | None = None) -> Job:
    """max_answers: the most answers (prompts times n) the server queues, checked before the prompts are read (a
    million one-letter prompts took seconds)."""
    settings = sampling(body, COMPLETIONS, chat=False)
    model = _model(body, served)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, f"prompt must be a string or a non-empty array of strings, got {_type_name(prompt)}",
                       "prompt")
    _answers(settings, len(prompts), max_answers, "prompt")
    return Job(model, [Document([_text(p, f"prompt[{i}]")]) for i, p in enumerate(prompts)], settings, "prompt")


EMBEDDINGS = {"model", "input", "encoding_format", "dimensions", "user"}
MAX_INPUTS = 2048  # inputs in one embeddings request, as OpenAI


@dataclass
class EmbeddingJob:
    model: str
    inputs: list  # each a text (str) or an image (PIL)
    base64: bool  # encoding_format "base64": little-endian float32 bytes, as OpenAI


def embedding_job(body: dict, served: str, limits: Limits) -> EmbeddingJob:
    """An embeddings request: `input` a string or an array of strings, each a text or an image given as a
    data:image/<type>;base64,<data> URL."""
    unknown = sorted(set(body) - EMBEDDINGS)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; this endpoint reads {', '.join(sorted(EMBEDDINGS))}",
                       unknown[0])
    model = _model(body, served)
    given = body.get("input")
    items = [given] if isinstance(given, str) else given
    if not isinstance(items, list) or not 0 < len(items) <= MAX_INPUTS or not all(isinstance(x, str) for x in items):
        raise ApiError(400, f"input must be a string or an array of 1 to {MAX_INPUTS} strings (texts, or images as "
                            f"data:image/<type>;base64,<data> URLs), got {json.dumps(given)[:80]}", "input")
    if body.get("dimensions") is not None:
        raise ApiError(400, f"dimensions is not supported: the model's embeddings have one width, got "
                            f"{json.dumps(body['dimensions'])}", "dimensions")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ApiError(400, f"encoding_format must be float or base64, got {json.dumps(encoding)}", "encoding_format")
    images = sum(x.startswith("data:image/") for x in items)
    if images > limits.max_media:
        raise ApiError(400, f"the request has {images} images; the limit is {limits.max_media}", "input")
    inputs = [data_image(x, f"input[{i}]", limits) if x.startswith("data:image/") else _text(x, f"input[{i}]").text
              for i, x in enumerate(items)]
    return EmbeddingJob(model, inputs, encoding == "base64")
