"""`polymodal serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over continuous batching.

GET /v1/models, GET /health (503 once the worker has stopped), GET /metrics (Prometheus text, see
`request_log`), POST /v1/chat/completions and POST /v1/completions (OpenAI's request and response shapes,
`stream: true` as server-sent events ending in a usage chunk and `data: [DONE]`) for a generative model,
POST /v1/embeddings for a CLIP / SigLIP dual encoder (`embeddings`), and the chat page at `/` with its examples
at GET /v1/examples (`examples`). A body past
`Limits.max_body_bytes` is refused (413) before it is parsed. One thread runs the `Batcher`; each request's choices are its requests there, and
their events come back to the event loop through an asyncio queue. A client that goes away cancels its
requests, which leave the batch at the next step. Drawn images are content parts
{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} (see README, Serving). A chat answer
with places (location tokens) carries them parsed in `message.locations`, streamed in the last chunk's
`delta.locations` (`answer.Locator`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading
import time
import uuid
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

import polymodal as pm
from polymodal.families.collators import make_collator
from polymodal.data.tokenizer import Tokenizer
from polymodal.generation.batching import Batcher, QueueFull, Request
from polymodal.generation.prompts import ContextError, prompts
from polymodal.families import spec_of
from polymodal.encoders.mask_vae import load_mask_vae, mask_vae_of
from polymodal.serve.answer import Answer, Locator, has_location_tokens
from polymodal.serve.embeddings import Embedder
from polymodal.serve.examples import Examples
from polymodal.serve.logprobs import Logprobs
from polymodal.serve.protocol import ApiError, Job, Limits, chat_job, completion_job, embedding_job, parse_body
from polymodal.serve.request_log import Metrics, RequestLog
from polymodal.serve.relay import Relay

CHAT_PAGE = Path(__file__).with_name("chat.html")
INLINE_PROMPT_CHARS = 512  # prompts of text this long and images this small are laid out on the event loop
INLINE_IMAGE_PIXELS = 256 * 256
INLINE_BODY_BYTES = 64 << 10  # request bodies up to this size are parsed (images decoded) on the event loop


class Server:
    """The model, its tokenizer and collator; for a generative model the batcher and its thread, for a dual
    encoder (CLIP / SigLIP) the embedder."""

    def __init__(self, directory: str | Path, *, name: str | None = None, slots: int = 8, max_queue: int = 64,
                 limits: Limits = Limits(), mask_vae: str | Path | None = None, compile: bool = False,
                 dtype: torch.dtype | str | None = None):
        self.directory = directory = Path(directory)  # as given: a run directory or a checkpoint
        self.name = name or directory.resolve().name  # the model id clients send
        self.model = pm.from_pretrained(directory, dtype=dtype)  # float32 unless asked
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.mask_vae = load_mask_vae(mask_vae) if mask_vae is not None else mask_vae_of(self.model)
        self.tokenizer = Tokenizer.from_file(directory)
        self.locations = has_location_tokens(self.tokenizer)
        self.collator = make_collator(self.model.config, self.tokenizer)
        self.limits = limits
        self.embedder = Embedder(self.model, self.collator) if spec_of(self.model).pairs else None
        self.needs_image = spec_of(self.model).needs_image
        self.batcher = self.thread = None
        if self.embedder is None:
            self.context = self.collator.format.max_len
            self.batcher = Batcher(self.model, slots=slots, max_len=self.context, max_waiting=max_queue,
                                   compile=compile)
            self.thread = threading.Thread(target=self.batcher.run, name="batcher", daemon=True)
        else:
            self.context = self.collator.max_len
        self.metrics = Metrics(self.gauges)
        self.relays: dict[asyncio.AbstractEventLoop, Relay] = {}  # by the event loop the responses wait in

    @property
    def alive(self) -> bool:
        """False once the batcher's thread has ended (it ends only at shutdown, or when it failed)."""
        return self.thread is None or self.thread.is_alive()

    def gauges(self) -> dict[str, float]:
        b = self.batcher
        return {"queue_depth": len(b.waiting) if b else 0, "running_requests": b.running if b else 0,
                "worker_alive": int(self.alive)}

    def relay(self, loop: asyncio.AbstractEventLoop) -> Relay:
        """The relay into `loop` (one per loop the responses wait in: uvicorn's, or each test client's); those of
        closed loops let go."""
        if loop not in self.relays:
            self.relays = {**{other: r for other, r in self.relays.items() if not other.is_closed()}, loop: Relay(loop)}
        return self.relays[loop]

    def serving(self, endpoint: str) -> None:
        """An error unless the served model answers `endpoint` ("chat" or "embeddings"), and its worker lives."""
        if endpoint == "embeddings" and self.embedder is None:
            raise ApiError(400, f"the model {self.name!r} writes text; /v1/embeddings needs a CLIP or SigLIP dual "
                                "encoder (ask /v1/chat/completions or /v1/completions)", "model", "model_not_supported")
        if endpoint == "chat" and self.embedder is not None:
            raise ApiError(400, f"the model {self.name!r} is a dual encoder (CLIP / SigLIP): it writes no text; ask "
                                "/v1/embeddings", "model", "model_not_supported")
        if not self.alive:
            raise ApiError(503, "the model worker has stopped; this server answers no more requests", None,
                           "worker_dead")

    def prompts(self, job: Job) -> list[tuple[dict, int]]:
        """Each document laid out as `polymodal generate` lays it out (one unpadded row), and the new tokens it
        may write; a text surely past the context is refused before it is tokenised whole (`fits`), the exact
        count is the batcher's, when the requests are submitted."""
        out = []
        for doc in job.documents:
            if self.needs_image and not any(s.kind == "image" for s in doc.segments):  # as `polymodal generate`
                raise ApiError(400, f"the model {self.name!r} answers about an image: each prompt needs an image_url "
                                    "part (HF's processor refuses a prompt without one too)", job.field)
            self.fits(doc, job.field)
            try:
                inputs, wanted = prompts(self.collator, [doc], job.sampling.max_tokens)
            except ValueError as e:
                raise ApiError(400, str(e), job.field) from e
            del inputs["attention_mask"]  # one unpadded row
            out.append((inputs, wanted))
        return out

    def locator(self, doc) -> Locator | None:
        """How an answer to `doc` gives its places: in pixels of its last image (None without one, or when the
        tokenizer has no location tokens)."""
        images = [s.media for s in doc.segments if s.kind == "image"]
        if not self.locations or not images:
            return None
        return Locator((images[-1].height, images[-1].width), self.mask_vae)

    def fits(self, doc, param: str, piece: int = 4096) -> None:
        """A 400 as soon as the document's text counts more tokens than the context, without tokenising past it:
        the text is counted in pieces of about `piece` characters cut before a space, and one token per cut is
        forgiven (a cut may split what would have been one token), so only a prompt surely too long is refused
        here; the exact count is the batcher's."""
        texts = [s.text for s in doc.segments if s.kind == "text"]
        if sum(map(len, texts)) <= self.context:  # short enough to tokenise whole: the prompt builder counts it
            return
        counted = cuts = 0
        for text in texts:
            start = 0
            while start < len(text):
                end = len(text) if len(text) - start <= piece else text.rfind(" ", start + 1, start + piece)
                end = start + piece if end <= start else end
                counted += len(self.tokenizer.encode(text[start:end], split_special_tokens=True))
                cuts += end < len(text)
                start = end
                if counted - cuts > self.context:
                    raise ApiError(400, f"the prompt is over {self.context} tokens (counted to there of its "
                                        f"{sum(map(len, texts))} characters), past the model's context of "
                                        f"{self.context} tokens", param, "context_length_exceeded")


def _chunk(kind: str, rid: str, created: int, model: str, **fields) -> dict:
    return {"id": rid, "object": kind, "created": created, "model": model, **fields}


class Response:
    """One HTTP request's choices running in the batcher, and their events."""

    def __init__(self, server: Server, job: Job, prompts: list, loop: asyncio.AbstractEventLoop, arrived: float):
        self.server, self.arrived, self.first = server, arrived, True
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prompt_tokens = sum(inputs["input_ids"].shape[1] for inputs, _ in prompts)
        self.requests: list[Request] = []
        relay = server.relay(loop)  # one wake-up of the loop for a step's events
        s = job.sampling
        for doc, (inputs, wanted) in zip(job.documents, prompts):
            locate = server.locator(doc)
            for j in range(s.n):
                index = len(self.requests)

                def push(events, index=index):
                    relay.put(self.queue, (index, events))

                answer = Answer(server.tokenizer, s.stop, server.model, push, locate,
                                whole=not s.stream and s.logprobs is None)
                request = Request(
                    inputs, max_new_tokens=wanted, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                    repetition_penalty=s.repetition_penalty, frequency_penalty=s.frequency_penalty,
                    presence_penalty=s.presence_penalty, seed=None if s.seed is None else s.seed + j,
                    top_logprobs=s.logprobs, stop_token_ids=(server.tokenizer.eos_id,), on_finish=answer.on_finish)
                request.on_token = answer.on_token if s.logprobs is None else self._with_logprobs(request, answer, push)
                self.requests.append(request)
        try:
            server.batcher.submit(*self.requests)
        except ContextError as e:
            if s.max_tokens is None:  # the rest of the context was asked for: the prompt alone fills it
                raise ApiError(400, str(e.named("the least answer (max_tokens was not given)",
                                                note=f": shorten {job.field}")),
                               job.field, "context_length_exceeded") from e
            raise ApiError(400, str(e.named("max_tokens")), "max_tokens", "context_length_exceeded") from e
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", None, "queue_full") from e

    @staticmethod
    def _with_logprobs(request: Request, answer: Answer, push):
        """The answer's listener, each token's ("logprobs", entry) event sent before its text."""
        def on_token(token: int) -> bool:
            push([("logprobs", (token, *request.logprobs[-1]))])
            return answer.on_token(token)
        return on_token

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled = True

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.requests)

    async def events(self, gone=None):
        """(choice index, event) until every choice is done, or until `gone()` (polled while no event comes)
        says the client went away; one ("error", ...) event, then the end, when the worker has died meanwhile."""
        pending = len(self.requests)
        while pending:
            try:
                index, events = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if gone is not None and await gone():
                    return
                if not self.server.alive:
                    yield 0, ("error", "the model worker has stopped")
                    return
                continue
            for event in events:
                pending -= event[0] in ("done", "error")
                if self.first and event[0] in ("text", "image"):
                    self.first = False
                    self.server.metrics.first_token(time.perf_counter() - self.arrived)
                yield index, event

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if server.thread is not None:
            server.thread.start()
        yield
        if server.thread is not None:
            server.batcher.close()  # uvicorn has drained the open responses by now
            await run_in_threadpool(server.thread.join)

    app = FastAPI(title="polymodal", lifespan=lifespan)
    app.add_middleware(RequestLog, metrics=server.metrics)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        return JSONResponse(ApiError(500, f"{type(e).__name__}: {e}").body(), status_code=500)

    @app.get("/")
    async def page():
        return HTMLResponse(CHAT_PAGE.read_text())

    app.add_api_route("/v1/examples", Examples(server).answer, methods=["GET"])  # the chat page's examples

    @app.get("/health")
    async def health():
        b = server.batcher
        state = {"status": "ok" if server.alive else "worker stopped", "model": server.name, "dtype": server.dtype,
                 "slots": b.slots if b else 0, "running": b.running if b else 0, "waiting": len(b.waiting) if b else 0,
                 "finished": dict(b.finished) if b else {}}
        return JSONResponse(state, status_code=200 if server.alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0,
                                            "owned_by": "polymodal"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await run(server, http, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await run(server, http, chat=False)

    @app.post("/v1/embeddings")
    async def embeddings(http: HttpRequest):
        server.serving("embeddings")
        job = await _read(await read_body(http, server.limits.max_body_bytes),
                          lambda body: embedding_job(body, server.name, server.limits))
        answer = await run_in_threadpool(server.embedder.answer, job)
        http.state.usage = {**answer["usage"], "completion_tokens": 0}
        return answer

    return app


async def run(server: Server, http: HttpRequest, chat: bool):
    """One completion request: its choices submitted to the batcher, answered whole or streamed."""
    arrived = time.perf_counter()
    server.serving("chat")
    job = await _read(await read_body(http, server.limits.max_body_bytes), lambda body: (
        chat_job(body, server.name, server.limits, server.batcher.max_waiting, server.context) if chat else
        completion_job(body, server.name, server.limits, server.batcher.max_waiting)))
    prompts = server.prompts(job) if _inline(job) else await run_in_threadpool(server.prompts, job)
    response = Response(server, job, prompts, asyncio.get_running_loop(), arrived)
    http.state.usage = response.usage  # for the request's log line (serve/request_log.py), read at its end
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    if job.sampling.stream:
        return StreamingResponse(_stream(server, response, job, kind, rid, created, chat),
                                 media_type="text/event-stream")
    return await _whole(server, response, http, kind, rid, created, chat)


async def _read(raw: bytes, read):
    """`read(parse_body(raw))`: the request's job, read off the event loop when the body is large, as decoding its
    images is (a 4096x4096 PNG took 0.17 s of CPU: eight of them on the loop stopped every stream for 1.5 s)."""
    if len(raw) <= INLINE_BODY_BYTES:
        return read(parse_body(raw))
    return await run_in_threadpool(lambda: read(parse_body(raw)))


def _inline(job: Job) -> bool:
    """Whether the job's prompts are laid out on the event loop: short text and small images (tokenised, resized
    and laid out in tenths of a millisecond) cost less than the hop to a worker thread and back, a thread wake-up
    each way, whose wait for the GIL beside the batcher thread came to tens of milliseconds under load. Long
    texts, large images, audio and video are laid out off the loop."""
    segments = [s for doc in job.documents for s in doc.segments]
    return (all(s.kind in ("text", "image") for s in segments)
            and sum(len(s.text) for s in segments if s.kind == "text") <= INLINE_PROMPT_CHARS
            and all(s.media.width * s.media.height <= INLINE_IMAGE_PIXELS for s in segments if s.kind == "image"))


async def _stream(server: Server, response: Response, job: Job, kind: str, rid: str, created: int, chat: bool):
    chunk = lambda **f: _chunk(kind + (".chunk" if chat else ""), rid, created, server.name, **f)  # noqa: E731
    try:
        if chat:
            for i in range(len(response.requests)):
                yield _sse(chunk(choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]))
        places: dict[int, list] = {}
        logprobs = Logprobs(server.tokenizer, response.requests, chat)
        async for i, (what, value) in response.events():
            if what == "error":
                yield _sse(ApiError(500, value).body())
                continue
            if what == "locations":  # sent with the choice's last chunk
                places[i] = value
                continue
            if what == "logprobs":  # sent with the choice's next chunk
                logprobs.entries[i].append(value)
                continue
            done = what == "done"
            if chat:
                if done:
                    delta = {"locations": places.pop(i)} if i in places else {}
                else:
                    delta = {"content": value if what == "text" else [_image_part(value)]}
                choice = {"index": i, "delta": delta, "finish_reason": value if done else None}
            else:
                choice = {"index": i, "text": "" if done or what == "image" else value,
                          "finish_reason": value if done else None}
            choice["logprobs"] = logprobs.take(i)
            yield _sse(chunk(choices=[choice]))
        if job.sampling.include_usage:
            yield _sse(chunk(choices=[], usage=response.usage()))
        yield _sse("[DONE]")
    finally:
        response.cancel()  # a client that left: its requests leave the batch at the next step


async def _whole(server: Server, response: Response, http: HttpRequest, kind: str, rid: str, created: int,
                 chat: bool):
    parts: list[list[dict]] = [[] for _ in response.requests]
    reasons: list[str | None] = [None] * len(response.requests)
    places: dict[int, list] = {}
    logprobs = Logprobs(server.tokenizer, response.requests, chat)
    try:
        async for i, (what, value) in response.events(gone=http.is_disconnected):
            if what == "error":
                raise ApiError(500, value)
            if what == "logprobs":
                logprobs.entries[i].append(value)
            elif what == "done":
                reasons[i] = value
            elif what == "locations":
                places[i] = value
            elif what == "text" and parts[i] and parts[i][-1]["type"] == "text":
                parts[i][-1]["text"] += value
            else:
                parts[i].append({"type": "text", "text": value} if what == "text" else _image_part(value))
    finally:
        response.cancel()
    if None in reasons:  # the client went away; its requests were cancelled
        return None
    choices = []
    for i, (content, reason) in enumerate(zip(parts, reasons)):
        text = "".join(p["text"] for p in content if p["type"] == "text")
        if chat:
            drawn = any(p["type"] == "image_url" for p in content)
            message = {"role": "assistant", "content": content if drawn else text,
                       **({"locations": places[i]} if i in places else {})}
            choices.append({"index": i, "message": message, "logprobs": logprobs.take(i), "finish_reason": reason})
        else:
            choices.append({"index": i, "text": text, "logprobs": logprobs.take(i), "finish_reason": reason})
    return _chunk(kind, rid, created, server.name, choices=choices, usage=response.usage())


async def read_body(http: HttpRequest, limit: int, linger: int = 4) -> bytes:
    """The request body, refused (413) past `limit` bytes without being kept or parsed. A body announced (by its
    Content-Length) past `linger` times the limit is refused at once; a smaller one is read to its end and
    dropped first (as nginx's lingering close), so a client still sending it reads the 413 instead of a broken
    pipe."""
    length = http.headers.get("content-length", "")
    too_big = f"over the limit of {limit} bytes (polymodal serve --max-body-mb)"
    if length.isdigit() and int(length) > linger * limit:
        raise ApiError(413, f"the request body is {int(length)} bytes, {too_big}", None, "body_too_large")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > linger * limit:
            break
    if size > limit:
        given = f"{int(length)} bytes" if length.isdigit() else f"more than {min(size, linger * limit)} bytes"
        raise ApiError(413, f"the request body is {given}, {too_big}", None, "body_too_large")
    return b"".join(chunks)


def _image_part(png: str) -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}


def serve(directory: str | Path, *, name: str | None = None, host: str = "127.0.0.1", port: int = 8000, slots: int = 8,
          max_queue: int = 64, limits: Limits = Limits(), mask_vae: str | Path | None = None,
          compile: bool = False, dtype: torch.dtype | str | None = None) -> None:
    server = Server(directory, name=name, slots=slots, max_queue=max_queue, limits=limits, mask_vae=mask_vae,
                    compile=compile, dtype=dtype)
    weights = f"{server.dtype} weights"
    if server.embedder is not None:
        what = f"embeddings, texts up to {server.context} tokens, {weights}"
    else:
        pool = server.batcher.cache.pool_bytes
        what = f"{slots} slots, context {server.context} tokens, {weights}, KV cache {pool / 2**20:,.1f} MiB"
    print(f"serving {server.name} on http://{host}:{port} ({what})", flush=True)
    gc.collect()
    gc.freeze()  # the model and libraries are never garbage: a full collection would walk them all, pausing answers
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning")
