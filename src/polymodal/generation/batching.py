"""Continuous batching (Orca, Yu et al. 2022) on a paged KV cache (vLLM, Kwon et al. 2023), with prefix caching
and batched prefill.

A `Batcher` runs the model protocol on one `nn.paged_cache.PagedCache`: each running request is a sequence
holding blocks as it grows and giving them back when it stops, is cancelled or fails (a failed one's blocks
are never shared). At each step boundary waiting requests are admitted, up to `prefill_tokens` prompt tokens
(so a wave of arrivals spreads over a few steps and its later requests find the earlier prefixes cached),
while a row is free and the pool has
the blocks their worst case (prompt + max_new_tokens) could take beside the running ones' worst cases, so a
step never runs short; each new request looks its prompt up in the prefix cache (keys: token ids, per-token
inputs, every media item's content hash, `prompt_keys`); one whose prefix a request admitted beside it (or still
being written) will file waits for it, keeping its place (SGLang's cache-aware scheduling), and starts on the hit
once it is filed (in the same step when that step's prefill wrote it). A text prompt (no media, no per-token inputs) to a
model whose decoder packs starts with nothing run; the others without a hit are prefilled together, in one
left-padded call per media layout (padding takes no slot), their media encoded through the batcher's
`EncoderCache`s (the same image twice is encoded once): a long causal prompt up to its media spans' ends (their
end tokens included: a chunk never splits a span) and `prefill_chunk` tokens at least, a prefix-LM's (a model
with per-token inputs) whole. Then one call continues every sequence: a running request feeds its last token, a
request with prompt tokens still to run (a new text prompt, or the rest after a hit or a first chunk) feeds the
next `prefill_chunk` of them, `prefill_tokens` at most over the step's chunks (chunked prefill beside the decode
rows), and takes its first token from its prompt's last logit. For a model that packs (`LanguageModel.packs`)
that call is packed (`nn.paged_cache.PackedStep`): every row's tokens in one row of the real tokens, no
padding, attention per row, the head only at the rows that choose a token; so a step with text arrivals makes
one call, as HF's continuous batching flattens its requests (`cumulative_seqlens_q`). A model whose attention
reads rows (ALiBi's bias, the flex backend, Flamingo's cross-attention) gets the rows padded to the longest feed
(the rows feeding chunks in a call of their own when padding the others to them would more than double the call).

Each request has its own sampling settings (temperature, top-k, top-p, repetition / frequency / presence
penalties) and stop tokens (one `Chooser` per setting; a row's seen tokens kept beside it), seed and listener,
which may stop it (stop strings) and sees every token as it is chosen, with its log-probabilities when asked
(`logprobs`: the softmax of the logits the token was chosen from, penalties applied, before temperature, top-k
and top-p). Rows never share positions or columns, so each sees exactly the keys it has alone: its greedy
tokens equal `generate` alone, and a seeded request draws its noise from its own generator as
`generate(seed=...)` does. A cross-attention model's rows keep their own media K/V in the paged cache too.

A call reads a `PackedStep` or `PagedStep`, its host work (blocks, slots, segments) done before the call, so
with `compile=True` the calls run through `torch.compile` with dynamic shapes and reuse a few graphs whatever the
rows and their lengths. The host work per step is kept small, as the model's own is at small sizes: a waiting
request's prompt keys are made once however long it waits, a decode step feeds the rows' last tokens in one gather,
every greedy row without a logit processor chooses in one argmax, and stop tokens are checked on the host list.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from polymodal.errors import InputError, check_ids, check_number
from polymodal.families import spec_of
from polymodal.fusion.early import EarlyFusion
from polymodal.generation.choice import Chooser
from polymodal.generation.prompt_keys import prompt_keys
from polymodal.generation.prompts import check_context, check_vocabulary, has_media
from polymodal.generation.sampling import exponential_noise
from polymodal.nn.language_model import LanguageModel
from polymodal.nn.media_cache import EncoderCache
from polymodal.nn.paged_cache import PagedCache
from polymodal.nn.prefix_keys import PromptKeys


MAX_TOP_LOGPROBS = 20  # as OpenAI


class QueueFull(RuntimeError):
    """More requests wait than the batcher queues."""


@dataclass(eq=False)
class Request:
    inputs: dict[str, torch.Tensor]  # one prompt, batch of 1, no padding (as `Collator.prompts` makes it)
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    top_logprobs: int | None = None  # None: no log-probabilities; k: each token's and the k most likely ones'
    stop_token_ids: tuple[int, ...] = ()
    on_token: Callable[[int], bool] | None = None  # each new token, in the batcher's thread; False stops it
    on_finish: Callable[[Request], None] | None = None  # once, when it left (finish_reason / error set; it may make
    # it an "error", counted so)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # per token, with top_logprobs
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: Exception | None = None
    cancelled: bool = False  # set from any thread; the request leaves at the next step boundary

    def __post_init__(self) -> None:
        ids = self.inputs.get("input_ids")
        if ids is not None:
            check_ids(ids)  # as `generate`: its prefill would copy floats into the batch's ids
        if ids is None or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise InputError(f"a request's input_ids must be (1, seq) with seq > 0, got "
                             f"{None if ids is None else tuple(ids.shape)}")
        mask = self.inputs.get("attention_mask")
        if mask is not None:  # as `generation.prompts` gives it: an unpadded prompt's says nothing, and is let go
            if not torch.is_tensor(mask) or mask.shape != ids.shape or not bool((mask == 1).all()):
                raise InputError(f"a request's prompt has no padding: its attention_mask must be ones of shape "
                                 f"{tuple(ids.shape)}, got {mask.tolist() if torch.is_tensor(mask) else mask}"[:300])
            self.inputs = {k: v for k, v in self.inputs.items() if k != "attention_mask"}
        check_number("max_new_tokens", self.max_new_tokens, integer=True, at_least=1)  # as `generate`
        self.stop_token_ids = tuple(self.stop_token_ids)  # a list is no key of the batcher's choosers
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None:
            check_number("top_k", self.top_k, integer=True, at_least=1)
        check_number("repetition_penalty", self.repetition_penalty, above=0)
        check_number("frequency_penalty", self.frequency_penalty, at_least=-2, at_most=2)
        check_number("presence_penalty", self.presence_penalty, at_least=-2, at_most=2)
        if self.top_logprobs is not None:
            check_number("top_logprobs", self.top_logprobs, integer=True, at_least=0, at_most=MAX_TOP_LOGPROBS)
        self.generator = None
        if self.temperature > 0:
            self.generator = torch.Generator(device=ids.device)
            self.generator.manual_seed(self.seed if self.seed is not None else int(torch.randint(2**62, ())))

    @property
    def prompt_len(self) -> int:
        return self.inputs["input_ids"].shape[1]


@dataclass(eq=False)
class _Sequence:
    """A running request's place in the paged cache."""

    seq: int  # its sequence id in the cache
    blocks: int  # the most blocks its prompt and max_new_tokens may take
    pending: torch.Tensor  # (n,) prompt tokens the step calls still run (a text prompt, or after a hit or a chunk)


class Batcher:
    """`submit` from any thread; `step` (or `run` in a thread) from one. `slots`: requests running at once;
    `max_len`: a request's prompt + new tokens; `n_blocks` (default: room for `slots` requests of max_len)
    blocks of `block_size` tokens in the pool; `prefill_tokens`: prompt tokens admitted per step (at least one
    request), so a wave of arrivals is prefilled over several steps beside the decode steps and the later ones
    find the earlier ones' prefixes cached, and the most prompt tokens a step's call runs in chunks;
    `prefill_chunk`: prompt tokens a request runs per step in the step's call (a long causal prompt's first
    prefill of media runs at least as many); `compile`: the step calls
    through `torch.compile` (a prefill of media stays eager)."""

    def __init__(self, model: LanguageModel, *, slots: int, max_len: int, max_waiting: int = 256,
                 block_size: int = 16, n_blocks: int | None = None, prefill_chunk: int = 256, prefill_tokens: int = 512,
                 encoder_cache_bytes: int = 64 << 20, compile: bool = False):
        if slots < 1 or max_len < 2 or min(prefill_chunk, prefill_tokens) < 1:
            raise InputError(f"a batcher needs slots >= 1, max_len >= 2, prefill_chunk and prefill_tokens >= 1; got "
                             f"{slots}, {max_len}, {prefill_chunk} and {prefill_tokens}")
        if not isinstance(model, LanguageModel):
            raise InputError(f"a batcher needs a model that writes tokens; a {type(model).__name__} writes nothing")
        self.model, self.slots, self.max_len, self.max_waiting = model, slots, max_len, max_waiting
        self.prefill_chunk, self.prefill_tokens = prefill_chunk, prefill_tokens
        # a step call reads a `PackedStep` / `PagedStep` (tensors only): compiled with dynamic shapes, any rows and
        # lengths reuse a few graphs (dims of 1 are specialised); eager runs the same code
        self.decode = torch.compile(model.decode, dynamic=True) if compile else model.decode
        self.cache = PagedCache.for_model(model, n_blocks or slots * -(-max_len // block_size) + 1, block_size)
        modalities = model.modalities if isinstance(model, EarlyFusion) else ()
        self.encoder_caches = {m.key: EncoderCache(encoder_cache_bytes) for m in modalities}  # by media key
        self.rows: list[Request | None] = [None] * slots
        self.seqs: list[_Sequence | None] = [None] * slots
        self.next_seq = 0
        device = self.cache.device
        self.last = torch.zeros(slots, dtype=torch.long, device=device)  # each row's latest token, fed to the next step
        self.state = torch.zeros(slots, dtype=torch.long, device=device)  # each row's image-span mode
        self.seen: list[torch.Tensor | None] = [None] * slots  # each row's tokens so far (1, V), with a penalty
        self.choosers: dict[tuple, Chooser] = {}  # one per sampling setting and stop tokens asked for
        self.chooser_of: list[Chooser | None] = [None] * slots  # each row's
        self.waiting: deque[Request] = deque()
        self.held: list[tuple[Request, PromptKeys]] = []  # waiting requests `_admit` held this step, with their keys
        self.admission: dict[Request, PromptKeys | None] = {}  # waiting requests' `_keys`
        self.finished: Counter[str] = Counter()  # requests that left, by finish reason
        self.work = threading.Condition()
        self.closed = False

    def blocks_for(self, request: Request) -> int:
        return -(-(request.prompt_len + request.max_new_tokens) // self.cache.block_size)

    def submit(self, *requests: Request) -> None:
        """Queues the requests, all or none: each checked against the batcher's context, the model's (as `generate`
        checks it: a max_len past it would let a row pass max_seq_len in a step call, failing every row), its KV
        cache and its vocabulary (stop tokens), and all of them against the room left in the queue."""
        if len(requests) > self.max_waiting:  # not a full queue: it never fits, however long one waits
            raise InputError(f"{len(requests)} requests were submitted at once; the most this batcher queues is "
                             f"{self.max_waiting}")
        usable, text = self.cache.pool.n_blocks - 1, self.model.text_config
        for request in requests:
            media = has_media(self.model, request.inputs)
            check_context(request.prompt_len, request.max_new_tokens, self.max_len, media=media, whose="the batcher's")
            check_context(request.prompt_len, request.max_new_tokens, text.max_seq_len, media=media)
            for token in request.stop_token_ids:  # as `generate` checks its eos_token_id
                check_number("stop_token_ids", token, integer=True, at_least=0, below=text.vocab_size)
            if self.blocks_for(request) > usable:
                raise InputError(f"the request may take {self.blocks_for(request)} blocks of {self.cache.block_size} "
                                 f"tokens; the batcher's KV cache has {usable}")
        with self.work:
            if len(self.waiting) + len(requests) > self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the most this server queues is "
                                f"{self.max_waiting}, and {len(requests)} more were asked")
            self.waiting.extend(requests)
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
        """One step boundary: drop cancelled requests, admit waiting ones (started on their cached prefix; those
        with media prefilled together), then one call continues every running request."""
        for row, request in enumerate(self.rows):
            if request is not None and request.cancelled:
                self._leave(row, "cancelled")
        with self.work:
            gone = [request for request in self.waiting if request.cancelled]
        for request in gone:  # now, not once a row frees (its queue place answered others 429 meanwhile)
            self._dequeue(request, "cancelled")
        new = [row for row in self._admit() if self.cache.lengths[self.seqs[row].seq] == 0 and self._run(row)]
        for group in self._layouts(new).values():
            self._start(group)
        self._admit_held()  # on the prefixes just written: their rows join this step's decode call
        live = [row for row in range(self.slots) if self.rows[row] is not None and row not in new]
        live += [row for row in new if self.rows[row] is not None]
        if live:
            try:
                self._continue(live)
            except Exception as e:  # noqa: BLE001 - every running request fails, the batcher goes on
                for row in live:
                    if self.rows[row] is not None:  # a row that had finished before the error left already
                        self.rows[row].error = e
                        self._leave(row, "error", failed=True)

    def _admit(self) -> list[int]:
        """Waiting requests into free rows, first come first served, while the pool holds their worst case
        beside the running ones'; each started on its prompt's cached prefix. A request that waits for a prefix
        being written (`_held`) keeps its place, its row and its blocks counted as taken, and the ones behind it
        may go first. Returns their rows."""
        admitted, budget, self.held = [], self.prefill_tokens, []
        committed = sum(s.blocks for s in self.seqs if s is not None)
        rows, steps = self.rows.count(None), None  # steps: `_steps_left`, made when a request may be held
        with self.work:
            queue = list(self.waiting)  # `submit` appends from other threads
        for request in queue:
            if not rows:
                break
            if not request.cancelled and committed + self.blocks_for(request) > self.cache.pool.n_blocks - 1:
                break  # it waits for blocks
            if not request.cancelled and admitted and request.prompt_len > budget:
                break  # it waits for the next step's prefill
            if request.cancelled:
                self._dequeue(request, "cancelled")
                continue
            try:
                keys = self._keys(request)
            except Exception as e:  # noqa: BLE001 - a request whose prompt the model refuses fails alone
                request.error = e
                self._dequeue(request, "error")
                continue
            gains = self.cache.awaited(keys)[1] if keys is not None else {}
            if gains and self._held(gains, steps := steps or self._steps_left()):
                committed, rows = committed + self.blocks_for(request), rows - 1
                self.held.append((request, keys))
            else:
                self._dequeue(request)
                admitted.append(self._start_request(request, keys))
                committed, rows = committed + self.seqs[admitted[-1]].blocks, rows - 1
                budget -= request.prompt_len
                steps = None  # its prompt is being written now: a request behind it may wait for it
        return admitted

    def _keys(self, request: Request) -> PromptKeys | None:
        """A waiting request's prompt keys (`_checked_keys`, which raises what the model refuses of its prompt): a
        constant of the request, made once however many steps it waits."""
        if request not in self.admission:
            self.admission[request] = self._checked_keys(request)
        return self.admission[request]

    def _dequeue(self, request: Request, reason: str | None = None) -> None:
        """The request leaves the queue (`submit` appends from other threads), finished if a reason is given."""
        with self.work:
            self.waiting.remove(request)
        self.admission.pop(request, None)
        if reason is not None:
            self._finish(request, reason)

    def _steps_left(self) -> dict[int, int]:
        """The steps each running sequence's prompt still takes (one at least, its last token's), by sequence."""
        return {s.seq: max(1, -(-len(s.pending) // self.prefill_chunk)) for s in self.seqs if s is not None}

    def _held(self, gains: dict[int, int], steps: dict[int, int]) -> bool:
        """Whether a waiting request waits for a prefix being written (SGLang's cache-aware scheduling): a request
        admitted beside it or still prefilling in chunks, its prompt not yet filed in the prefix cache, will file
        more of this prompt than the cache holds (`gains`, `PagedCache.awaited`), within the steps this request's
        own prefill of those tokens would take (one step at least; `steps`, `_steps_left`). It is admitted on the
        hit once the prefix is filed, or prefills itself once the writer failed or was cancelled (a failed prompt is
        never filed). Decided again at every step: the cache moves on."""
        return any(seq in steps and steps[seq] <= -(-gain // self.prefill_chunk) for seq, gain in gains.items())

    def _admit_held(self) -> None:
        """After the step's prefill: the requests `_admit` held that now find their prefix filed start on the hit,
        and the rest of their prompt runs in the step's decode call (no step lost). One still waiting for a prompt
        prefilled in chunks, or whose writer failed (it finds nothing), is looked at again at the next step."""
        steps = None
        for request, keys in self.held:
            if request.cancelled:
                continue
            cached, gains = self.cache.awaited(keys)
            if cached and not (gains and self._held(gains, steps := steps or self._steps_left())):
                self._dequeue(request)
                self._start_request(request, keys)
                steps = None
        self.held = []

    def _start_request(self, request: Request, keys: PromptKeys | None) -> int:
        """A free row for the request, started on its prompt's cached prefix; returns the row."""
        row, seq = self.rows.index(None), self.next_seq
        self.next_seq += 1
        hit = self.cache.add(seq, keys)
        self.rows[row] = request
        first = hit or (0 if self._packed_text(request) else self._first_chunk(request, keys))
        self.seqs[row] = _Sequence(seq, self.blocks_for(request), request.inputs["input_ids"][0, first:])
        vocab = self.model.text_config.vocab_size
        self.chooser_of[row] = self._chooser(request)
        state, self.seen[row] = self.chooser_of[row].start(request.inputs["input_ids"], None, vocab)
        if state is not None:
            self.state[row] = state[0]
        return row

    def _packed_text(self, request: Request) -> bool:
        """A text prompt (no media, no per-token inputs: causal) to a model that packs: the packed steps run all of
        it, in chunks."""
        return (self.model.packs and not spec_of(self.model).per_token_inputs
                and all(v is None for k, v in request.inputs.items() if k != "input_ids"))

    def _checked_keys(self, request: Request) -> PromptKeys | None:
        """The prompt's prefix-cache keys (`prompt_keys`, which checks its media spans against its media), once the
        model takes its tokens: it raises, before any compute, what `generate` refuses (a token past the
        vocabulary) and, for a prompt without media, what its prefill would (`check_prompt`). The step calls
        check nothing, and may run any prompt: a packed text prompt, any other's rest after a hit or a first
        chunk (unchecked, a refused one failed every running row)."""
        ids = request.inputs["input_ids"]
        check_vocabulary(ids, self.model.text_config.vocab_size)
        if not has_media(self.model, request.inputs):
            self.model.check_prompt(ids)
        return prompt_keys(self.model, request.inputs)

    def _first_chunk(self, request: Request, keys) -> int:
        """The prompt tokens the prefill of a new request with media or per-token inputs runs: all of them, or, for
        a long causal prompt, its media spans whole, end tokens included (`PromptKeys.media_end`), and
        `prefill_chunk` tokens at least; the rest runs in chunks beside the decode steps. A model with per-token
        inputs (a prefix-LM: its prompt may be one bidirectional block, with or without them given) is prefilled
        whole."""
        P = request.prompt_len
        causal = keys is not None and not spec_of(self.model).per_token_inputs
        return max(self.prefill_chunk, keys.media_end) if causal and P > self.prefill_chunk else P

    def _start(self, rows: list[int]) -> None:
        """Prefills the rows together and emits their first tokens; when the model refuses the batch, each row
        starts again alone on fresh blocks, so a request the model refuses fails alone."""
        try:
            logits = self._prefill(rows)
        except Exception as e:  # noqa: BLE001 - the batcher goes on
            for row in rows:
                self.cache.free(self.seqs[row].seq, failed=True)
                self.seqs[row].seq, self.next_seq = self.next_seq, self.next_seq + 1
                self.cache.add(self.seqs[row].seq)
                if len(rows) == 1:
                    self.rows[row].error = e
                    self._leave(row, "error", failed=True)
                else:
                    self._start([row])
            return
        done = [b for b, row in enumerate(rows) if not len(self.seqs[row].pending)]  # the others run on in chunks
        chosen = [rows[b] for b in done]
        if chosen:
            self._emit(chosen, self._choose(logits[done], chosen))

    def _run(self, row: int) -> int:
        """Prompt tokens a new row's prefill runs."""
        return self.rows[row].prompt_len - len(self.seqs[row].pending)

    def _layouts(self, rows: list[int]) -> dict[tuple, list[int]]:
        """Rows whose inputs batch together: the same inputs, media of the same shape but their count, options
        (PaliGemma's `interpolate_pos_encoding`) of the same value."""
        groups: dict[tuple, list[int]] = {}
        for row in rows:
            inputs = self.rows[row].inputs
            layout = tuple(sorted((k, tuple(v.shape[1:]) if torch.is_tensor(v) else
                                   type(v).__name__ if isinstance(v, (list, tuple)) else v)
                                  for k, v in inputs.items() if k != "input_ids" and v is not None))
            groups.setdefault(layout, []).append(row)
        return groups

    def _prefill(self, rows: list[int]) -> torch.Tensor:
        """The rows' prompts in one left-padded prefill call (their media encoded through the encoder caches);
        returns each one's last logits (B, V)."""
        requests = [self.rows[row] for row in rows]
        lengths = [self._run(row) for row in rows]
        S = max(lengths)
        per_token = set(spec_of(self.model).per_token_inputs)
        pad = self.model.text_config.pad_token_id or 0
        ids = torch.full((len(rows), S), pad, dtype=torch.long, device=self.cache.device)
        mask = torch.zeros_like(ids)
        inputs: dict = {}
        for b, (request, P) in enumerate(zip(requests, lengths)):
            ids[b, S - P:], mask[b, S - P:] = request.inputs["input_ids"][0, :P], 1
            for k, v in request.inputs.items():
                if k == "input_ids" or v is None:
                    continue
                if k in per_token:
                    inputs.setdefault(k, torch.zeros(len(rows), S, *v.shape[2:], dtype=v.dtype, device=v.device))
                    inputs[k][b, S - P:] = v[0, :P]
                elif not torch.is_tensor(v) and not isinstance(v, (list, tuple)):
                    inputs[k] = v  # an option, the same for every row of a layout
                else:  # media: each row's items, in row order
                    inputs.setdefault(k, []).append(v)
        for k, v in inputs.items():
            if isinstance(v, list):
                inputs[k] = torch.cat(v) if torch.is_tensor(v[0]) else [item for items in v for item in items]
        uneven = len(set(lengths)) > 1
        batch = self.cache.batch([self.seqs[row].seq for row in rows])
        out = self.model.prefill(ids, batch, attention_mask=mask if uneven else None,
                                 encoder_caches=self.encoder_caches, **inputs)
        return out.logits[:, -1]

    def _continue(self, rows: list[int]) -> None:
        """The call over `rows` that continues them: each feeds its last token, or the next chunk of its prompt (up
        to `prefill_chunk` tokens, and `prefill_tokens` over the step's chunks: a row past them waits a step); a
        row that fed its last prompt token or a token of its own chooses its next one. For a model that packs,
        every row's tokens run in one row, one-token rows first (`PagedCache.packed`); otherwise the rows are
        padded (`_padded`)."""
        fed, budget = [], self.prefill_tokens
        for row in sorted(rows, key=lambda row: self.seqs[row].seq):  # the budget in order of admission: later
            # arrivals in lower rows took it every step, starving an earlier long prompt
            pending = len(self.seqs[row].pending)
            n = min(pending, self.prefill_chunk, budget) if pending else 1
            budget -= n if pending else 0
            if n:
                fed.append((n > 1, row, n))
        fed.sort(key=lambda f: f[0])  # stable: rows keep their order within the one-token rows and the others
        rows, counts = [row for _, row, _ in fed], [n for _, _, n in fed]
        device = self.cache.device
        if any(len(self.seqs[row].pending) for row in rows):
            feeds = []
            for row, n in zip(rows, counts):
                s = self.seqs[row]
                feeds.append(s.pending[:n].to(device) if len(s.pending) else self.last[row:row + 1])
                s.pending = s.pending[n:]
            tokens = torch.cat(feeds)  # (T,) every row's, one after the other
        else:  # a decode step: every row feeds its last token
            tokens = self.last[rows]
        seqs = [self.seqs[row].seq for row in rows]
        ready = [b for b, row in enumerate(rows) if not len(self.seqs[row].pending)]
        if self.model.packs:
            step = self.cache.packed(seqs, counts)  # the ready rows' logits at their last tokens only
            ends = list(accumulate(counts))
            keep = torch.tensor([ends[b] - 1 for b in ready], dtype=torch.long, device=device)
            logits = self.decode(tokens[None], step, logits_to_keep=keep).logits[0]
        else:
            logits = self._padded(seqs, counts, tokens)
            if len(ready) < len(rows):
                logits = logits[torch.tensor(ready, dtype=torch.long, device=device)]
        if ready:
            chosen = [rows[b] for b in ready]
            self._emit(chosen, self._choose(logits, chosen))

    def _padded(self, seqs: list[int], counts: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """Each row's logits at its last fed token (B, V) for a model that does not pack, from every row's tokens one
        after the other (T,): the rows padded to the longest feed, in two calls (the one-token rows, first, and the
        others) when padding them together would more than double the call's tokens (every padding token costs a
        real one's compute)."""
        ones = counts.count(1)
        split = 0 < ones < len(counts) and len(counts) * max(counts) > 2 * sum(counts)
        out, start = [], 0
        for part in ((range(ones), range(ones, len(counts))) if split else (range(len(counts)),)):
            c = [counts[b] for b in part]
            fed, start, S = tokens[start:start + sum(c)], start + sum(c), max(c)
            if S == 1:
                padded = fed[:, None]
            else:  # right-padded: row i's tokens in its first c[i] columns
                padded = fed.new_zeros(len(c), S)
                padded[torch.arange(S, device=fed.device) < torch.tensor(c, device=fed.device)[:, None]] = fed
            step = self.cache.step([seqs[b] for b in part], S, new_tokens=c)
            logits = self.decode(padded, step, logits_to_keep=0).logits
            out.append(logits[:, 0] if S == 1 else logits[torch.arange(len(c)), torch.tensor(c) - 1])
        return torch.cat(out) if split else out[0]

    def _chooser(self, request: Request) -> Chooser:
        """The chooser of the request's settings, made once per setting (its image spans' table built once)."""
        r = request
        key = (r.temperature, r.top_p, r.top_k, r.repetition_penalty, r.frequency_penalty, r.presence_penalty,
               r.stop_token_ids)
        if key not in self.choosers:
            self.choosers[key] = Chooser.make(
                self.model, device=self.last.device, eos_token_id=list(r.stop_token_ids), do_sample=r.temperature > 0,
                temperature=r.temperature or 1.0, top_p=r.top_p, top_k=r.top_k, repetition_penalty=r.repetition_penalty,
                frequency_penalty=r.frequency_penalty, presence_penalty=r.presence_penalty)
        return self.choosers[key]

    def _groups(self, rows: list[int], *, choosing: bool = False) -> dict[Chooser, list[int]]:
        """Indices into `rows` by the chooser of their request; `choosing`: every plain chooser's rows (greedy, no
        logit processor: `Chooser.plain`) under the first one's, as they choose alike, by one argmax."""
        groups: dict[Chooser, list[int]] = {}
        plain = None
        for i, row in enumerate(rows):
            chooser = self.chooser_of[row]
            if choosing and chooser.plain:
                chooser = plain = plain or chooser
            groups.setdefault(chooser, []).append(i)
        return groups

    def _choose(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The next token of each of `rows` from its logits (R, V): rows sharing settings choose together (every
        greedy row without a logit processor in one argmax), a sampled one with noise from its own generator. A
        request asking for log-probabilities gets them from the processed logits its token was chosen from
        (`logprobs`)."""
        groups = self._groups(rows, choosing=True)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device) if len(groups) > 1 else None
        for chooser, index in groups.items():
            whole = len(groups) == 1  # every row, in order
            group = rows if whole else [rows[i] for i in index]
            noise = None
            if chooser.do_sample:
                noise = torch.cat([exponential_noise(logits[i:i + 1], self.rows[r].generator)
                                   for i, r in zip(index, group)])
            state = self.state[group] if chooser.spans is not None else None
            processed = chooser.processed(logits if whole else logits[index], state, self._seen(group))
            chosen = chooser.draw(processed, noise)[0]
            if whole:
                tokens = chosen
            else:
                tokens[index] = chosen
            for b, row in enumerate(group):
                if self.rows[row].top_logprobs is not None:
                    self.rows[row].logprobs.append(logprobs(processed[b], int(chosen[b]), self.rows[row].top_logprobs))
        return tokens

    def _seen(self, group: list[int]) -> torch.Tensor | None:
        """The tokens the rows of one chooser have seen (R, V), None without a penalty."""
        return torch.cat([self.seen[row] for row in group]) if self.seen[group[0]] is not None else None

    def _emit(self, rows: list[int], tokens: torch.Tensor) -> None:
        """Each row's new token: its image-span mode and seen tokens advanced, its listener told; its request ends at
        one of its stop tokens, when its listener says so, or at max_new_tokens."""
        for chooser, index in self._groups(rows).items():
            group = [rows[i] for i in index]
            if chooser.spans is None and self.seen[group[0]] is None:
                continue  # no state to advance
            state = self.state[group] if chooser.spans is not None else None
            state, seen = chooser.advance(state, self._seen(group), tokens[index])
            if state is not None:
                self.state[group] = state
            if seen is not None:
                for row, row_seen in zip(group, seen.split(1)):
                    self.seen[row] = row_seen
        self.last[rows] = tokens
        for row, token in zip(rows, tokens.tolist()):
            request = self.rows[row]
            request.tokens.append(token)
            try:
                keep = request.on_token(token) if request.on_token is not None else True
            except Exception as e:  # noqa: BLE001 - its listener failed (e.g. drawing its image): it fails alone
                request.error = e
                self._leave(row, "error")
                continue
            if token in request.stop_token_ids or not keep:  # as its chooser's `stops`
                self._leave(row, "stop")
            elif len(request.tokens) >= request.max_new_tokens:
                self._leave(row, "length")

    def _leave(self, row: int, reason: str, *, failed: bool = False) -> None:
        """The request leaves its row; its blocks go back (a failed call's are never shared)."""
        request, self.rows[row] = self.rows[row], None
        self.cache.free(self.seqs[row].seq, failed=failed)
        self.seqs[row], self.seen[row], self.chooser_of[row] = None, None, None
        self._finish(request, reason)

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        on_finish, request.on_token, request.on_finish = request.on_finish, None, None
        if on_finish is not None:  # the listeners are let go: one that refers to its request makes no cycle
            try:
                on_finish(request)  # it may make it an "error": an end its listener could not write
            except Exception as e:  # noqa: BLE001 - its listener failed: it ends an error, alone (raised here, it
                # failed the step's every row, or ended `run`)
                request.finish_reason, request.error = "error", e if request.error is None else request.error
        self.finished[request.finish_reason] += 1


def logprobs(processed: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` and the `top` most likely (id, log-probability) pairs under the softmax of
    the processed logits (V,) it was chosen from: after the penalties and the image-span mask, before
    temperature, top-k and top-p. Tokens the mask rules out (-inf) are never listed."""
    lp = processed.float().log_softmax(-1)
    values, ids = lp.topk(min(top, lp.shape[-1]))
    return float(lp[token]), [(i, v) for i, v in zip(ids.tolist(), values.tolist()) if v != float("-inf")]
