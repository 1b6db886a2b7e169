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
from polymodal.generation.sampling import exponential_noise, probabilities, processed, race
from polymodal.nn.cache import Cache

MAX_NGRAM = 2  # prompt lookup's longest n-gram, HF's default max_matching_ngram_size


def vocab_size(model: nn.Module) -> int:
    config = model.config
    return config.vocab_size if hasattr(config, "vocab_size") else config.text.vocab_size


def placeholder_ids(model: nn.Module) -> list[int]:
    """The token ids whose embeddings a model replaces with media (not text a text-only draft can read)."""
    config = model.config
    ids = [getattr(config, "image_token_id", None), getattr(getattr(config, "tokens", None), "placeholder", None)]
    return [i for i in ids if i is not None]


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
    if not hasattr(assistant_model, "make_cache"):
        raise InputError(f"assistant_model must be a polymodal language model, got {type(assistant_model).__name__}")
    if vocab_size(assistant_model) != vocab_size(model):
        raise InputError(f"the draft's vocabulary ({vocab_size(assistant_model)} tokens) must be the target's "
                         f"({vocab_size(model)} tokens): drafts are checked token by token")
    given = [k for k, v in model_inputs.items() if v is not None]
    if given and all(k in draft_inputs(assistant_model) for k in given) and (
            type(assistant_model.config) is not type(model.config)
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


def draft_one(draft: nn.Module, cache: Cache, token: torch.Tensor, state: torch.Tensor | None,
              seen: torch.Tensor | None, noise: torch.Tensor | None, *, spans, allowed: torch.Tensor | None,
              penalty: float, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None):
    """The draft on each row's last token (B,): its next token, the distribution q (B, V) it was drawn from
    (None when greedy), and the span state and seen tokens after it."""
    logits = draft(input_ids=token[:, None], cache=cache, logits_to_keep=1).logits[:, -1]
    logits = processed(logits, state, seen, spans=spans, allowed=allowed, penalty=penalty)
    q = None
    if do_sample:
        q = probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        token = race(q, noise)
    else:
        token = logits.argmax(-1)
    if state is not None:
        state = spans.advance(state, token)
    if seen is not None:
        seen = seen.scatter(1, token[:, None], True)
    return token, q, state, seen


def feed(model: nn.Module, cache: Cache, token: torch.Tensor) -> None:
    """Writes a token (B,) into the cache (a draft catching up on a draft it proposed and saw kept)."""
    model(input_ids=token[:, None], cache=cache, logits_to_keep=1)


def verify(model: nn.Module, cache: Cache, token: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None,
           state: torch.Tensor | None, seen: torch.Tensor | None, uniform: torch.Tensor | None,
           noise: torch.Tensor | None, *, spans, allowed: torch.Tensor | None, penalty: float, do_sample: bool,
           temperature: float, top_k: int | None, top_p: float | None):
    """The target on [token, drafts] (B, k+1) and the rejection rule. Returns per row the drafts accepted
    (B,), the target's own next token (B,), and the span state and seen tokens after both. q (B, k, V): the
    draft's distributions (None: a point mass on each draft); uniform (B, k) U[0, 1) and noise (B, V) Exp(1)
    draws when sampling."""
    B, k = drafts.shape
    logits = model(input_ids=torch.cat([token[:, None], drafts], 1), cache=cache, logits_to_keep=k + 1).logits
    states, seens = [state], [seen]  # the processors' inputs at each of the k+1 positions
    for j in range(k):
        if state is not None:
            states.append(spans.advance(states[-1], drafts[:, j]))
        if seen is not None:
            seens.append(seens[-1].scatter(1, drafts[:, j, None], True))
    state = torch.stack(states, 1) if state is not None else None  # (B, k+1)
    seen = torch.stack(seens, 1) if seen is not None else None  # (B, k+1, V)
    logits = processed(logits, state, seen, spans=spans, allowed=allowed, penalty=penalty)  # (B, k+1, V)
    if do_sample:
        p = probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p)
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
        nxt = race(residual, noise)
    else:
        best = logits.argmax(-1)  # (B, k+1)
        accepted = (drafts == best[:, :k]).long().cumprod(1).sum(1)
        nxt = best.gather(1, accepted[:, None])[:, 0]
    if state is not None:
        state = spans.advance(state.gather(1, accepted[:, None])[:, 0], nxt)
    if seen is not None:
        seen = seen[torch.arange(B, device=seen.device), accepted].scatter(1, nxt[:, None], True)
    return accepted, nxt, state, seen


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


def decode(drafting: Drafting, model: nn.Module, cache: Cache, draft_cache: Cache | None, prompt: torch.Tensor,
           attention_mask: torch.Tensor | None, model_inputs: dict, token: torch.Tensor, finished: torch.Tensor,
           state: torch.Tensor | None, seen: torch.Tensor | None, *, max_new_tokens: int,
           generator: torch.Generator | None, compile: bool, stop_ids: torch.Tensor | None, pad_token_id: int,
           **choice) -> torch.Tensor:
    """Rounds of draft-and-verify after the prefill, from each row's first token `token` (B,) on; returns
    the new tokens (B, T) padded with pad_token_id after each row's end. prompt (B, S), attention_mask,
    model_inputs: the target's prefill inputs, left-aligned; draft_cache: the draft's, empty (None for lookup)."""
    B, S = prompt.shape
    k, draft, device = drafting.k, drafting.assistant, prompt.device
    if draft is not None:
        try:
            draft(**draft_prompt(drafting, model, prompt, attention_mask, model_inputs), cache=draft_cache,
                  logits_to_keep=1)
        except InputError as e:  # the prompt suits the target: whatever the draft refuses is the draft's fault
            raise InputError(f"the draft (assistant_model, a {type(draft).__name__}) cannot read the target's "
                             f"prompt: {e}") from e
    cuda = compile and device.type == "cuda"
    run = (lambda fn: compiled(fn, cuda)) if compile else (lambda fn: fn)
    caches = [c for c in (cache, draft_cache) if c is not None]
    for c in caches:  # the rounds keep the host state fixed; `fill` tracks slots on the host here
        c.reserve(c.max_len - c.length)
    fills = [int(c.fill) for c in caches]

    def call(fn, *args, **kwargs):
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        out = run(fn)(*args, **kwargs)
        return [t if not isinstance(t, torch.Tensor) else t.clone() for t in out] if cuda and out else out

    history = torch.full((B, S + max_new_tokens + k + 2), pad_token_id, dtype=torch.long, device=device)
    history[:, :S] = prompt if attention_mask is None else prompt.masked_fill(attention_mask == 0, -1)
    history[:, S] = token
    count = torch.ones(B, dtype=torch.long, device=device)  # new tokens so far per row
    steps = torch.arange(k + 1, device=device)
    scratch = history.shape[1] - 1  # where the tokens past a row's end are written
    like_logits = torch.empty(B, vocab_size(model), device=device)  # the shape of the sampling noise
    do_sample = choice["do_sample"]
    finished = finished | (count >= max_new_tokens)
    done = bool(finished.all())
    while not done:
        if any(fill + k + 1 > c.max_len for fill, c in zip(fills, caches)):
            for c in caches:
                c.compact()
            fills = [int(c.fill) for c in caches]
        q = None
        if draft is None:
            drafts = lookup(history, S + count, k, pad_token_id)
        else:
            drafts, qs, draft_state, draft_seen, last = [], [], state, seen, token
            for _ in range(k):
                noise = exponential_noise(like_logits, generator) if do_sample else None
                last, q_j, draft_state, draft_seen = call(draft_one, draft, draft_cache, last, draft_state,
                                                          draft_seen, noise, **choice)
                drafts.append(last)
                qs.append(q_j)
            drafts = torch.stack(drafts, 1)
            q = torch.stack(qs, 1) if do_sample else None
        uniform = noise = None
        if do_sample:
            uniform = torch.rand(B, k, generator=generator, device=device)
            noise = exponential_noise(like_logits, generator)
        accepted, nxt, state, seen = call(verify, model, cache, token, drafts, q, state, seen, uniform, noise,
                                          **choice)
        tokens = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, accepted[:, None], nxt[:, None])  # (B, k+1)
        running = ~finished
        n = accepted + 1
        if stop_ids is not None:  # a row ends at its first stop token
            stops = torch.isin(tokens, stop_ids) & (steps < n[:, None])
            n = torch.where(stops.any(1), stops.long().argmax(1) + 1, n)
            finished = finished | (running & stops.any(1))
        n = torch.where(running, torch.minimum(n, max_new_tokens - count), 0)
        history.scatter_(1, torch.where(steps < n[:, None], S + count[:, None] + steps, scratch), tokens)
        count = count + n
        finished = finished | (count >= max_new_tokens)
        kept = torch.where(finished, 0, accepted + 1)
        longest, all_done = torch.stack([kept.max(), finished.all().long()]).tolist()
        cache.rollback(k + 1, kept)
        fills[0] += longest
        if draft is not None:
            written = k
            if longest == k + 1:  # a row kept its k-th draft, which the draft has not read yet
                call(feed, draft, draft_cache, drafts[:, -1])
                written += 1
            draft_cache.rollback(written, kept)
            fills[1] += longest
        token, done = nxt, bool(all_done)
    new = history[:, S:S + max_new_tokens]
    return new.masked_fill(torch.arange(max_new_tokens, device=device) >= count[:, None], pad_token_id)[
        :, :int(count.max())]
