"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) for the one engine: a draft model (HF's
`assistant_model`) or n-gram lookup in the text so far (Saxena 2023, HF's `prompt_lookup_num_tokens`)
proposes k tokens per row, and the target scores them all in one forward over its static cache.

A round, for every row of the batch at once: the drafter proposes d1..dk after the row's last token t0;
the target runs on [t0, d1..dk] (k+1 tokens) and gives its distribution p_j at each; the row keeps the
longest run of drafts the rejection rule accepts and one token of the target's own (the correction at
the first rejection, or a bonus after k acceptances); both caches drop the rest (`Cache.rollback`), so
rows keep different numbers of tokens and stop on their own.

The rule (Leviathan et al., Algorithm 1): accept d_j with probability min(1, p_j(d_j) / q_j(d_j)), else
draw from max(0, p_j - q_j) normalised. p and q are the target's and the draft's distributions after
every logit processor (repetition penalty, image spans, temperature, top-k, top-p) at that position, so
the kept tokens follow the target's sampling law exactly. A lookup draft is a point mass q. Greedy: a
draft is kept while it is the target's argmax, so the output is the target's own greedy output.

A draft that reads no media (a text decoder beside a vision-language target) is given the prompt with
the media placeholders masked out: the text part. Prompt lookup matches as HF's does: the last n tokens
(n = MAX_NGRAM down to 1) at their earliest earlier occurrence, followed for up to k tokens.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from polymodal.errors import InputError
from polymodal.families import spec_of
from polymodal.generation.choice import Chooser
from polymodal.generation.sampling import exponential_noise, race
from polymodal.nn.cache import Cache
from polymodal.nn.language_model import LanguageModel

MAX_NGRAM = 2  # prompt lookup's longest n-gram, HF's default max_matching_ngram_size


def placeholder_ids(model: LanguageModel) -> list[int]:
    """The token ids whose embeddings a model replaces with media (not text a text-only draft can read)."""
    return list(spec_of(model).placeholders(model.config))


@dataclass
class Drafting:
    """What proposes the drafts: `assistant` (a model) or, when None, prompt lookup; k drafts per round."""

    k: int
    assistant: nn.Module | None = None

    @property
    def headroom(self) -> int:
        """Cache slots past prompt + max_new_tokens a round may write before it rolls back."""
        return self.k + 1


def plan(model: nn.Module, assistant_model: nn.Module | None, num_assistant_tokens: int | None,
         prompt_lookup_num_tokens: int | None, model_inputs: dict) -> Drafting | None:
    """The drafting these options ask for (None: plain decoding), checked before any compute."""
    if assistant_model is None and prompt_lookup_num_tokens is None:
        if num_assistant_tokens is not None:
            raise InputError("num_assistant_tokens needs an assistant_model (the draft model)")
        return None
    if assistant_model is not None and prompt_lookup_num_tokens is not None:
        raise InputError("give assistant_model (a draft model) or prompt_lookup_num_tokens (drafts from the "
                         "prompt), not both")
    if prompt_lookup_num_tokens is not None:
        if num_assistant_tokens is not None:
            raise InputError("num_assistant_tokens is for assistant_model; prompt lookup drafts "
                             "prompt_lookup_num_tokens tokens")
        k = prompt_lookup_num_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"prompt_lookup_num_tokens must be an int >= 1, got {k!r}")
        return Drafting(k)
    k = 5 if num_assistant_tokens is None else num_assistant_tokens
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"num_assistant_tokens must be an int >= 1, got {k!r}")
    if assistant_model is model:
        raise InputError("assistant_model is the target itself; the draft is a second (smaller) model")
    if not isinstance(assistant_model, LanguageModel):
        raise InputError(f"assistant_model must be a polymodal language model, got {type(assistant_model).__name__}")
    vocab, draft_vocab = model.text_config.vocab_size, assistant_model.text_config.vocab_size
    if draft_vocab != vocab:
        raise InputError(f"the draft's vocabulary ({draft_vocab} tokens) must be the target's "
                         f"({vocab} tokens): drafts are checked token by token")
    given = [k for k, v in model_inputs.items() if v is not None]
    if given and all(k in draft_inputs(assistant_model) for k in given) and (
            spec_of(assistant_model) is not spec_of(model)
            or placeholder_ids(assistant_model) != placeholder_ids(model)):
        raise InputError(f"the draft (assistant_model, a {type(assistant_model).__name__}) would read the "
                         f"target's {', '.join(given)} laid out for {type(model).__name__} (media token ids "
                         f"{placeholder_ids(model)}, the draft's {placeholder_ids(assistant_model)}): give a draft of "
                         "the target's family and tokenizer, or a text-only draft")
    media = [k for k in given if k not in draft_inputs(assistant_model)]
    if media and not placeholder_ids(model):
        raise InputError(f"the draft ({type(assistant_model).__name__}) takes no {media}, and "
                         f"{type(model).__name__} has no placeholder token that tells the prompt's text part")
    return Drafting(k, assistant_model)


def draft_inputs(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def draft_prompt(drafting: Drafting, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 model_inputs: dict) -> dict:
    """The draft's prefill inputs: the target's, or the text part for a draft that takes none of its media."""
    takes = draft_inputs(drafting.assistant)
    if all(k in takes for k, v in model_inputs.items() if v is not None):
        return dict(input_ids=input_ids, attention_mask=attention_mask, **model_inputs)
    text = ~torch.isin(input_ids, torch.tensor(placeholder_ids(model), device=input_ids.device))
    if attention_mask is not None:
        text &= attention_mask.bool()
    return dict(input_ids=input_ids, attention_mask=text.long())


def draft_one(draft: LanguageModel, cache: Cache, token: torch.Tensor, state: torch.Tensor | None,
              seen: torch.Tensor | None, noise: torch.Tensor | None, chooser: Chooser):
    """The draft on each row's last token (B,): its next token, the distribution q (B, V) it was drawn from
    (None when greedy), and the span state and seen tokens after it."""
    logits = draft.decode(token[:, None], cache).logits[:, -1]
    token, q = chooser.pick(logits, state, seen, noise)
    return token, q, *chooser.advance(state, seen, token)


def feed(model: LanguageModel, cache: Cache, token: torch.Tensor) -> None:
    """Writes a token (B,) into the cache (a draft catching up on a draft it proposed and saw kept)."""
    model.decode(token[:, None], cache)


def verify(model: LanguageModel, cache: Cache, token: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None,
           state: torch.Tensor | None, seen: torch.Tensor | None, uniform: torch.Tensor | None,
           noise: torch.Tensor | None, chooser: Chooser):
    """The target on [token, drafts] (B, k+1) and the rejection rule. Returns per row the drafts accepted
    (B,), the target's own next token (B,), and the span state and seen tokens after both. q (B, k, V): the
    draft's distributions (None: a point mass on each draft); uniform (B, k) U[0, 1) and noise (B, V) Exp(1)
    draws when sampling."""
    B, k = drafts.shape
    logits = model.decode(torch.cat([token[:, None], drafts], 1), cache, logits_to_keep=k + 1).logits
    states, seens = [state], [seen]  # the processors' inputs at each of the k+1 positions
    for j in range(k):
        after = chooser.advance(states[-1], seens[-1], drafts[:, j])
        states.append(after[0])
        seens.append(after[1])
    state = torch.stack(states, 1) if state is not None else None  # (B, k+1)
    seen = torch.stack(seens, 1) if seen is not None else None  # (B, k+1, V)
    logits = chooser.processed(logits, state, seen)  # (B, k+1, V)
    if chooser.do_sample:
        accepted, nxt = rejection(chooser.distribution(logits), drafts, q, uniform, noise)
    else:
        best = logits.argmax(-1)  # (B, k+1)
        accepted = (drafts == best[:, :k]).long().cumprod(1).sum(1)
        nxt = best.gather(1, accepted[:, None])[:, 0]
    if state is not None:
        state = state.gather(1, accepted[:, None])[:, 0]
    if seen is not None:
        seen = seen[torch.arange(B, device=seen.device), accepted]
    return accepted, nxt, *chooser.advance(state, seen, nxt)


def rejection(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, uniform: torch.Tensor,
              noise: torch.Tensor):
    """Leviathan et al.'s rule on the target's distributions p (B, k+1, V): the drafts accepted per row (B,)
    and the token drawn after them, from the residual max(0, p - q) at the first rejection (else p)."""
    k = drafts.shape[1]
    p_draft = p[:, :k].gather(2, drafts[..., None])[..., 0]  # (B, k)
    q_draft = q.gather(2, drafts[..., None])[..., 0] if q is not None else torch.ones_like(p_draft)
    accepted = (uniform * q_draft < p_draft).long().cumprod(1).sum(1)  # (B,)
    if q is None:
        q = torch.zeros_like(p[:, :k]).scatter_(2, drafts[..., None], 1.0)
    at = accepted[:, None, None].expand(-1, 1, p.shape[-1])
    p_at = p.gather(1, at)[:, 0]
    q_at = torch.cat([q, torch.zeros_like(q[:, :1])], 1).gather(1, at)[:, 0]  # no draft after the k-th
    residual = (p_at - q_at).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_at)  # p == q: never rejected
    return accepted, race(residual, noise)


def lookup(history: torch.Tensor, length: torch.Tensor, k: int, filler: int) -> torch.Tensor:
    """Prompt-lookup drafts (B, k): each row's last n tokens (n = MAX_NGRAM, then shorter) found earliest
    in history[b, :length[b]] (-1 marks padding), and up to k tokens that followed; `filler` where none did."""
    B, W = history.shape
    drafts = torch.full((B, k), filler, dtype=history.dtype, device=history.device)
    found = torch.zeros(B, dtype=torch.bool, device=history.device)
    steps = torch.arange(k, device=history.device)
    for n in range(MAX_NGRAM, 0, -1):
        gram = history.gather(1, length[:, None] - n + torch.arange(n, device=history.device))  # (B, n)
        starts = torch.arange(W - n + 1, device=history.device)
        match = (history.unfold(1, n, 1) == gram[:, None]).all(-1)  # (B, W-n+1)
        match &= (starts + n < length[:, None]) & (gram >= 0).all(-1, keepdim=True)  # something follows it
        first = match.long().argmax(1)
        use = match.any(1) & ~found
        follow = (first + n)[:, None] + steps  # (B, k)
        tokens = history.gather(1, follow.clamp(max=W - 1))
        tokens = torch.where(follow < length[:, None], tokens, filler)
        drafts = torch.where(use[:, None], tokens, drafts)
        found |= use
    return drafts


@functools.cache
def compiled(fn, cuda: bool):
    """Made once per function and kind; static shapes, as the engine's compiled decode step."""
    return torch.compile(fn, mode="reduce-overhead" if cuda else None, fullgraph=True, dynamic=False)


def decode(drafting: Drafting, model: LanguageModel, cache: Cache, draft_cache: Cache | None, prompt: torch.Tensor,
           attention_mask: torch.Tensor | None, model_inputs: dict, token: torch.Tensor, finished: torch.Tensor,
           state: torch.Tensor | None, seen: torch.Tensor | None, chooser: Chooser, *, max_new_tokens: int,
           generator: torch.Generator | None, compile: bool) -> torch.Tensor:
    """Rounds of draft-and-verify after the prefill, from each row's first token `token` (B,) on; returns
    the new tokens (B, T) padded with the chooser's pad_token_id after each row's end. prompt (B, S),
    attention_mask, model_inputs: the target's prefill inputs, left-aligned; draft_cache: the draft's, empty
    (None for lookup)."""
    B, S = prompt.shape
    k, draft, device, pad = drafting.k, drafting.assistant, prompt.device, chooser.pad_token_id
    if draft is not None:
        prefill_draft(drafting, model, draft_cache, prompt, attention_mask, model_inputs)
    call = caller(compile and device.type == "cuda", compile)
    caches = [c for c in (cache, draft_cache) if c is not None]
    for c in caches:  # the rounds keep the host state fixed; `fill` tracks slots on the host here
        c.reserve(c.max_len - c.length)
    fills = [int(c.fill) for c in caches]
    history = torch.full((B, S + max_new_tokens + k + 2), pad, dtype=torch.long, device=device)
    history[:, :S] = prompt if attention_mask is None else prompt.masked_fill(attention_mask == 0, -1)
    history[:, S] = token
    count = torch.ones(B, dtype=torch.long, device=device)  # new tokens so far per row
    like_logits = torch.empty(B, model.text_config.vocab_size, device=device)  # the shape of the sampling noise
    draw = (lambda: exponential_noise(like_logits, generator)) if chooser.do_sample else (lambda: None)
    finished = finished | (count >= max_new_tokens)
    done = bool(finished.all())
    while not done:
        if any(fill + k + 1 > c.max_len for fill, c in zip(fills, caches)):
            for c in caches:
                c.compact()
            fills = [int(c.fill) for c in caches]
        if draft is None:
            drafts, q = lookup(history, S + count, k, pad), None
        else:
            drafts, q = propose(call, draft, draft_cache, token, state, seen, chooser, k, draw)
        uniform = torch.rand(B, k, generator=generator, device=device) if chooser.do_sample else None
        accepted, nxt, state, seen = call(verify, model, cache, token, drafts, q, state, seen, uniform, draw(),
                                          chooser)
        tokens = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, accepted[:, None], nxt[:, None])  # (B, k+1)
        finished, count = kept(history, S, count, finished, tokens, accepted, chooser, max_new_tokens)
        keep = torch.where(finished, 0, accepted + 1)
        longest, all_done = torch.stack([keep.max(), finished.all().long()]).tolist()
        cache.rollback(k + 1, keep)
        fills[0] += longest
        if draft is not None:
            written = k
            if longest == k + 1:  # a row kept its k-th draft, which the draft has not read yet
                call(feed, draft, draft_cache, drafts[:, -1])
                written += 1
            draft_cache.rollback(written, keep)
            fills[1] += longest
        token, done = nxt, bool(all_done)
    new = history[:, S:S + max_new_tokens]
    return new.masked_fill(torch.arange(max_new_tokens, device=device) >= count[:, None], pad)[:, :int(count.max())]


def prefill_draft(drafting: Drafting, model: LanguageModel, draft_cache: Cache, prompt: torch.Tensor,
                  attention_mask: torch.Tensor | None, model_inputs: dict) -> None:
    draft = drafting.assistant
    inputs = draft_prompt(drafting, model, prompt, attention_mask, model_inputs)
    try:
        draft.prefill(inputs.pop("input_ids"), draft_cache, **inputs)
    except InputError as e:  # the prompt suits the target: whatever the draft refuses is the draft's fault
        raise InputError(f"the draft (assistant_model, a {type(draft).__name__}) cannot read the target's "
                         f"prompt: {e}") from e


def caller(cuda: bool, compile: bool):
    """`call(fn, *args)`: fn run compiled when asked (its outputs copied out of a CUDA graph's buffers)."""
    def call(fn, *args):
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        out = (compiled(fn, cuda) if compile else fn)(*args)
        return [t if not isinstance(t, torch.Tensor) else t.clone() for t in out] if cuda and out else out
    return call


def propose(call, draft: LanguageModel, cache: Cache, token: torch.Tensor, state: torch.Tensor | None,
            seen: torch.Tensor | None, chooser: Chooser, k: int, draw):
    """The draft's k tokens after each row's last token (B, k), and the distributions it drew them from
    (B, k, V; None when greedy)."""
    drafts, qs = [], []
    for _ in range(k):
        token, q, state, seen = call(draft_one, draft, cache, token, state, seen, draw(), chooser)
        drafts.append(token)
        qs.append(q)
    return torch.stack(drafts, 1), torch.stack(qs, 1) if chooser.do_sample else None


def kept(history: torch.Tensor, S: int, count: torch.Tensor, finished: torch.Tensor, tokens: torch.Tensor,
         accepted: torch.Tensor, chooser: Chooser, max_new_tokens: int):
    """Writes each running row's kept tokens of a round (B, k+1) into history, up to its first stop token and
    max_new_tokens; returns which rows have finished and each row's count of new tokens after it."""
    steps = torch.arange(tokens.shape[1], device=tokens.device)
    running = ~finished
    n = accepted + 1
    if chooser.stop_ids is not None:  # a row ends at its first stop token
        stops = chooser.stops(tokens) & (steps < n[:, None])
        n = torch.where(stops.any(1), stops.long().argmax(1) + 1, n)
        finished = finished | (running & stops.any(1))
    n = torch.where(running, torch.minimum(n, max_new_tokens - count), 0)
    scratch = history.shape[1] - 1  # where the tokens past a row's end are written
    history.scatter_(1, torch.where(steps < n[:, None], S + count[:, None] + steps, scratch), tokens)
    count = count + n
    return finished | (count >= max_new_tokens), count
