"""Continuous batching (Orca, Yu et al. 2022; vLLM's scheduler without paging) on the engine's static cache.

A `Batcher` holds one static KV cache of `slots` rows and runs the engine's model protocol on it:
between two decode steps (a step boundary) waiting requests are prefilled, each alone, and spliced into
free rows; then one decode step advances every row; a request leaves, and frees its row, as soon as it
stops. Each request has its own sampling settings and stop tokens (one `Chooser` per setting), seed and
listener, which may stop it (stop strings) and sees every token as it is chosen.

All rows share the cache's write column (`Cache.fill`), so a request is spliced into the columns just
before it, right-aligned like the engine's left padding; the mask comes from each slot's segments, never
from its column, so a row's earlier columns are masked pads. When the columns run out, `_realign` moves
every row's span to the left end (one copy of the cache); a long prompt may move them right instead.
A request's prefill runs in a cache of the size `generate` would give it and its decode steps see the same
keys, so its greedy tokens equal `generate` alone, and a seeded request draws its noise from its own
generator as `generate(seed=...)` does: the same tokens whatever else runs beside it.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from polymodal.errors import InputError
from polymodal.generation.choice import Chooser
from polymodal.generation.prompts import check_context
from polymodal.generation.sampling import exponential_noise
from polymodal.nn.language_model import LanguageModel


class QueueFull(RuntimeError):
    """More requests wait than the batcher queues."""


@dataclass(eq=False)
class Request:
    inputs: dict[str, torch.Tensor]  # one prompt, batch of 1, no padding (as `Collator.prompts` makes it)
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    on_token: Callable[[int], bool] | None = None  # each new token, in the batcher's thread; False stops it
    on_finish: Callable[[Request], None] | None = None  # once, when it left (finish_reason / error set)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: Exception | None = None
    cancelled: bool = False  # set from any thread; the request leaves at the next step boundary

    def __post_init__(self) -> None:
        ids = self.inputs.get("input_ids")
        if ids is None or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise InputError(f"a request's input_ids must be (1, seq) with seq > 0, got "
                             f"{None if ids is None else tuple(ids.shape)}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        self.generator = None
        if self.temperature > 0:
            self.generator = torch.Generator(device=ids.device)
            self.generator.manual_seed(self.seed if self.seed is not None else int(torch.randint(2**62, ())))

    @property
    def prompt_len(self) -> int:
        return self.inputs["input_ids"].shape[1]


class Batcher:
    """`submit` from any thread; `step` (or `run` in a thread) from one."""

    def __init__(self, model: LanguageModel, *, slots: int, max_len: int, max_waiting: int = 256):
        if slots < 1 or max_len < 2:
            raise InputError(f"a batcher needs slots >= 1 and max_len >= 2, got {slots} and {max_len}")
        if not isinstance(model, LanguageModel):
            raise InputError(f"a batcher needs a model that writes tokens; a {type(model).__name__} writes nothing")
        self.model, self.slots, self.max_len, self.max_waiting = model, slots, max_len, max_waiting
        self.cache = model.make_cache(slots, max_len)
        self.rows: list[Request | None] = [None] * slots
        self.start = [0] * slots  # each row's first column
        device = self.cache.fill.device
        self.last = torch.zeros(slots, dtype=torch.long, device=device)  # each row's latest token, fed to the next step
        self.state = torch.zeros(slots, dtype=torch.long, device=device)  # each row's image-span mode
        self.choosers: dict[tuple, Chooser] = {}  # one per (temperature, top_p, stop tokens) asked for
        self.waiting: deque[Request] = deque()
        self.finished: Counter[str] = Counter()  # requests that left, by finish reason
        self.work = threading.Condition()
        self.closed = False

    def submit(self, request: Request) -> None:
        check_context(request.prompt_len, request.max_new_tokens, self.max_len, whose="the batcher's")
        with self.work:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the most this server queues")
            self.waiting.append(request)
            self.work.notify()

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    def idle(self) -> bool:
        return not self.waiting and not self.running

    def run(self) -> None:
        """Steps until `close`; meant for a thread of its own."""
        while True:
            with self.work:
                while self.idle() and not self.closed:
                    self.work.wait()
                if self.closed and self.idle():
                    return
            self.step()

    def close(self) -> None:
        """`run` returns once every submitted request has finished."""
        with self.work:
            self.closed = True
            self.work.notify()

    @torch.no_grad()
    def step(self) -> None:
        """One step boundary: drop cancelled requests, admit waiting ones into free rows, then one decode step."""
        for row, request in enumerate(self.rows):
            if request is not None and request.cancelled:
                self._leave(row, "cancelled")
        while None in self.rows:
            with self.work:
                if not self.waiting:
                    break
                request = self.waiting.popleft()
            if request.cancelled:
                self._finish(request, "cancelled")
                continue
            try:
                self._admit(self.rows.index(None), request)
            except Exception as e:  # noqa: BLE001 - a request the model refuses fails alone
                request.error = e
                self._finish(request, "error")
        if self.running:
            try:
                self._decode()
            except Exception as e:  # noqa: BLE001 - every running request fails, the batcher goes on
                for row, request in enumerate(self.rows):
                    if request is not None:
                        request.error = e
                        self._leave(row, "error")

    def _admit(self, row: int, request: Request) -> None:
        """Prefill the request alone, splice its cache into `row`, choose its first token."""
        P = request.prompt_len
        alone = self.model.make_cache(1, P + request.max_new_tokens)
        inputs = dict(request.inputs)
        logits = self.model.prefill(inputs.pop("input_ids"), alone, **inputs).logits[:, -1]
        chooser = self._chooser(request)
        state, _ = chooser.start(request.inputs["input_ids"], None, logits.shape[-1])
        self._realign(need=P)
        F = self.cache.fill.item()
        for big, small in zip(self.cache.layers, alone.layers):
            big.k[row, :, F - P:F] = small.k[0, :, :P]
            big.v[row, :, F - P:F] = small.v[0, :, :P]
        for name, t in vars(self.cache.slots).items():
            t[row].zero_()
            t[row, F - P:F] = getattr(alone.slots, name)[0, :P]
        self.rows[row], self.start[row] = request, F - P
        if state is not None:
            self.state[row] = state[0]
        self._emit(row, self._choose(logits, [row]))

    def _decode(self) -> None:
        self._realign(need=0)
        logits = self.model.decode(self.last[:, None], self.cache).logits[:, -1]
        live = [row for row, request in enumerate(self.rows) if request is not None]
        self._emit(live, self._choose(logits[live], live))

    def _chooser(self, request: Request) -> Chooser:
        """The chooser of the request's settings, made once per setting (its image spans' table built once)."""
        key = (request.temperature, request.top_p, request.stop_token_ids)
        if key not in self.choosers:
            self.choosers[key] = Chooser.make(self.model, device=self.last.device, eos_token_id=list(key[2]),
                                              do_sample=request.temperature > 0, temperature=request.temperature or 1.0,
                                              top_p=request.top_p)
        return self.choosers[key]

    def _groups(self, rows: list[int]) -> dict[Chooser, list[int]]:
        """Indices into `rows` by the chooser of their request."""
        groups: dict[Chooser, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(self._chooser(self.rows[row]), []).append(i)
        return groups

    def _choose(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The next token of each of `rows` from its logits (R, V): rows sharing settings choose together, a
        sampled one with noise from its own generator."""
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for chooser, index in self._groups(rows).items():
            group = [rows[i] for i in index]
            noise = None
            if chooser.do_sample:
                noise = torch.cat([exponential_noise(logits[i:i + 1], self.rows[r].generator)
                                   for i, r in zip(index, group)])
            state = self.state[group] if chooser.spans is not None else None
            tokens[index] = chooser.pick(logits[index], state, None, noise)[0]
        return tokens

    def _emit(self, rows: list[int] | int, tokens: torch.Tensor) -> None:
        rows = [rows] if isinstance(rows, int) else rows
        stopped = torch.zeros(len(rows), dtype=torch.bool, device=tokens.device)
        for chooser, index in self._groups(rows).items():
            group = [rows[i] for i in index]
            if chooser.spans is not None:
                self.state[group] = chooser.advance(self.state[group], None, tokens[index])[0]
            stopped[index] = chooser.stops(tokens[index])
        self.last[rows] = tokens
        for row, token, stop in zip(rows, tokens.tolist(), stopped.tolist()):
            request = self.rows[row]
            request.tokens.append(token)
            keep = request.on_token(token) if request.on_token is not None else True
            if stop or not keep:
                self._leave(row, "stop")
            elif len(request.tokens) >= request.max_new_tokens:
                self._leave(row, "length")

    def _leave(self, row: int, reason: str) -> None:
        request, self.rows[row] = self.rows[row], None
        for t in vars(self.cache.slots).values():  # a free row's positions restart, so they never run past the context
            t[row].zero_()
        self._finish(request, reason)

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        self.finished[reason] += 1
        if request.on_finish is not None:
            request.on_finish(request)

    def _span(self) -> int:
        """Columns the longest running row takes."""
        F = self.cache.fill.item()
        return max((F - self.start[r] for r, req in enumerate(self.rows) if req is not None), default=0)

    def _realign(self, need: int) -> None:
        """Make sure the write column is at least `need` and one more column is free, moving every row's
        span (the same columns for all rows) when it is not."""
        F, span = self.cache.fill.item(), self._span()
        if need <= F and F < self.max_len:
            return
        to = max(span, need)
        for layer in self.cache.layers:
            for t in (layer.k, layer.v):
                t[:, :, to - span:to] = t[:, :, F - span:F].clone()
        free = [row for row, request in enumerate(self.rows) if request is None]
        for t in vars(self.cache.slots).values():  # every column but the moved ones becomes a pad
            moved = t[:, F - span:F].clone()
            t.zero_()
            t[:, to - span:to] = moved
            t[free] = 0
        self.start = [s - F + to for s in self.start]
        self.cache.fill.fill_(to)
        self.cache.length = to
