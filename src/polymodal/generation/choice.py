"""The one token chooser: logits -> the next token, and the per-row state that advances with it.

`Chooser` is used by the engine (`engine.decode_one`), speculative decoding (its draft steps and its
verification) and the continuous batcher: the logit processors in HF transformers' order (repetition
penalty, OpenAI's frequency and presence penalties, then the image-span mode of a model that writes images,
`ImageSpans`), greedy or sampled choice (temperature, top-k, top-p, the exponential race of `sampling`), and
the stop tokens. Each row's state is its image-span mode (B,) and the tokens it has seen (B, V), None where
unused: bool with the repetition penalty alone; with frequency or presence penalties int32, the times each
token was written plus `PROMPT` for a token of the prompt (which only the repetition penalty counts).
`StopStrings` is the same for text: it ends a streamed answer at a stop string and holds back a prefix
that could still become one.

A chooser is a frozen dataclass of plain values and tensors, so a compiled decode step takes it as an
argument and reads its settings as constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polymodal.generation.sampling import apply_count_penalties, apply_repetition_penalty, probabilities, race

PROMPT = 1 << 24  # added to a prompt token's count in `seen`: above any number of tokens written


@dataclass(frozen=True, eq=False)
class Chooser:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    penalty: float = 1.0  # the repetition penalty (CTRL); 1: none
    frequency: float = 0.0  # OpenAI's frequency penalty, per time a token was written
    presence: float = 0.0  # OpenAI's presence penalty, once a token was written
    spans: object | None = None  # the model's `ImageSpans` (None: it writes no images)
    allowed: torch.Tensor | None = None  # spans.allowed(V), built once so decode steps need not read codes
    stop_ids: torch.Tensor | None = None  # (n,) long; None: rows never stop on a token
    pad_token_id: int = 0  # what a row writes after it stopped

    @classmethod
    def make(cls, model, *, device: torch.device, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0, **sampling) -> Chooser:
        """The chooser for `model` (its vocabulary and image spans) with generate's settings; pad_token_id
        defaults to the first stop token (else 0)."""
        stop = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        spans = model.image_spans
        allowed = spans.allowed(model.text_config.vocab_size, device) if spans is not None else None
        return cls(penalty=repetition_penalty, frequency=frequency_penalty, presence=presence_penalty, spans=spans, allowed=allowed,
                   stop_ids=torch.tensor(stop, dtype=torch.long, device=device) if stop else None,
                   pad_token_id=pad_token_id if pad_token_id is not None else stop[0] if stop else 0, **sampling)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int):
        """Each row's state after its prompt (B, S): its image-span mode and, with a penalty, the tokens it
        holds (pads are not counted, as in HF)."""
        state = self.spans.start(input_ids, attention_mask) if self.spans is not None else None
        seen = None
        if self.penalty != 1.0 or self.counts:
            B, V = input_ids.shape[0], vocab_size
            ids = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, V)
            seen = torch.zeros(B, V + 1, dtype=torch.bool, device=input_ids.device).scatter_(1, ids, True)[:, :V]
            if self.counts:
                seen = seen.int() * PROMPT
        return state, seen

    @property
    def plain(self) -> bool:
        """Greedy with no logit processor: its token is the argmax of the logits, whatever its other settings."""
        return not self.do_sample and self.penalty == 1.0 and not self.counts and self.spans is None

    @property
    def counts(self) -> bool:
        """Whether `seen` counts the tokens written (frequency or presence penalties)."""
        return self.frequency != 0.0 or self.presence != 0.0

    def processed(self, logits: torch.Tensor, state: torch.Tensor | None, seen: torch.Tensor | None) -> torch.Tensor:
        """The logit processors that depend on the tokens so far, in float32 as HF's generate runs them (a
        penalty applied to bf16 logits rounds them into ties); logits (..., V), state (...), seen (..., V)."""
        logits = logits.float()
        if seen is not None and self.penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen > 0 if self.counts else seen, self.penalty)
        if seen is not None and self.counts:
            logits = apply_count_penalties(logits, seen % PROMPT, self.frequency, self.presence)
        if state is not None:
            logits = self.spans.mask(logits, state, self.allowed)
        return logits

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """What sampling draws from, given processed logits: temperature, then top-k, then top-p."""
        return probabilities(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def pick(self, logits: torch.Tensor, state: torch.Tensor | None, seen: torch.Tensor | None,
             noise: torch.Tensor | None):
        """The next token (B,) from raw logits (B, V), and the distribution it was drawn from (None when
        greedy); noise: Exp(1) draws (B, V) when sampling (drawn outside: dynamo does not trace generators)."""
        return self.draw(self.processed(logits, state, seen), noise)

    def draw(self, processed: torch.Tensor, noise: torch.Tensor | None):
        """`pick` on logits already `processed` (B, V): the continuous batcher reports log-probabilities from
        them."""
        if not self.do_sample:
            return processed.argmax(-1), None
        q = self.distribution(processed)
        return race(q, noise), q

    def advance(self, state: torch.Tensor | None, seen: torch.Tensor | None, token: torch.Tensor):
        """The image-span mode and seen tokens after each row wrote `token` (B,)."""
        if state is not None:
            state = self.spans.advance(state, token)
        if seen is not None and self.counts:
            seen = seen.scatter_add(1, token[:, None], torch.ones_like(token[:, None], dtype=seen.dtype))
        elif seen is not None:
            seen = seen.scatter(1, token[:, None], True)
        return state, seen

    def stops(self, tokens: torch.Tensor) -> torch.Tensor:
        """Which of `tokens` (any shape) are stop tokens."""
        if self.stop_ids is None:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, self.stop_ids)

    def choose(self, logits: torch.Tensor, finished: torch.Tensor, state: torch.Tensor | None,
               seen: torch.Tensor | None, noise: torch.Tensor | None):
        """One step for every row: its token (pad_token_id once it stopped), then whether it has stopped,
        its image-span mode and its seen tokens after it."""
        token = self.pick(logits, state, seen, noise)[0].masked_fill(finished, self.pad_token_id)
        state, seen = self.advance(state, seen, token)
        if self.stop_ids is not None:
            finished = finished | self.stops(token)
        return token, finished, state, seen


class StopStrings:
    """Stop strings on streamed text: `feed(text so far)` gives the new text safe to send and whether a stop
    string was reached (the text ends just before it); a suffix that could begin one is held back until it
    cannot, or until `flush`."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.sent = 0  # characters of the text already given out
        self.stopped = False

    def feed(self, text: str) -> str:
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                self.stopped = True
                out, self.sent = text[self.sent:at], at
                return out
        held = max((k for s in self.stop for k in range(len(s), 0, -1) if text.endswith(s[:k])), default=0)
        out = text[self.sent:len(text) - held]
        self.sent += len(out)
        return out

    def flush(self, text: str) -> str:
        """What remains of `text` unsent (the run ended), and a fresh start for the next run."""
        out, self.sent = text[self.sent:], 0
        return out
