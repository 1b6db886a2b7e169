"""One generation engine for every family: prefill once, then decode one token at a time.

A model takes part through a small protocol (gpt-fast's split): `model.make_cache(batch, max_len)`
returns a static cache, and `model(input_ids=..., cache=cache, logits_to_keep=1, **media)` is the
prefill (media are encoded here, once) while `model(input_ids=(B, 1), cache=cache, logits_to_keep=1)`
is one decode step. Prompts of different lengths are left-padded (right padding is moved left).

A model that writes images as discrete tokens (Chameleon) also has `model.image_spans`, an
`ImageSpans` state machine that masks each row's logits to its current mode (text, image codes,
image end), and `model.images_from_codes(codes per row)` -> PIL images per row for `return_images`.

`compile=True` runs `decode_one` (the model on each row's last token, then the logit processors and
sampling) through `torch.compile`, as CUDA graphs on CUDA; prefill and media encoding stay eager and
run once. Sampling noise is drawn outside the step, so a seed gives the same tokens either way. The
loop's only host sync is the stop check (with stop tokens only), read every `STOP_EVERY` steps when
compiled and every step eager; steps run after every row had stopped are dropped, so both return
the same tokens.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import NamedTuple

import torch
from torch import nn

from polymodal.generation.sampling import apply_repetition_penalty, exponential_noise, sample_next
from polymodal.nn.cache import Cache

PER_TOKEN_INPUTS = ("token_type_ids", "media_locations")  # model inputs laid out like input_ids, moved with it
STOP_EVERY = 8  # compiled decoding reads the stop flags (a host sync) once per this many steps
MAX_GRAPHS = 64  # compiled decode steps kept: one per model kind, shape and sampling setup (dynamo's default: 8)


class Generated(NamedTuple):
    tokens: torch.Tensor  # (B, T) new tokens
    images: list[list]  # per row, the PIL images it completed, in order


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, *others: torch.Tensor):
    """Move every row's tokens to the right end so padding is on the left (stable within a row)."""
    order = attention_mask.long().argsort(dim=1, stable=True)  # pads (0) first, tokens keep their order
    return tuple(t.gather(1, order) for t in (input_ids, attention_mask, *others))


def next_token(logits: torch.Tensor, finished: torch.Tensor, state: torch.Tensor | None, seen: torch.Tensor | None,
               noise: torch.Tensor | None, *, spans, allowed: torch.Tensor | None, penalty: float, pad_token_id: int,
               stop_ids: torch.Tensor | None, **sampling):
    """Each row's next token from its logits (B, V), and the per-row state after it: finished (B,) bool,
    the image-span mode state (B,) and the seen tokens (B, V) bool (None when unused). The logit processors
    run in float32, as HF's generate runs them: a penalty applied to bf16 logits rounds them into ties."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, penalty)
    if state is not None:
        logits = spans.mask(logits, state, allowed)
    token = sample_next(logits, noise=noise, **sampling).masked_fill(finished, pad_token_id)
    if state is not None:
        state = spans.advance(state, token)
    if seen is not None:
        seen = seen.scatter(1, token[:, None], True)
    if stop_ids is not None:
        finished = finished | torch.isin(token, stop_ids)
    return token, finished, state, seen


def decode_one(model: nn.Module, cache: Cache, token: torch.Tensor, finished: torch.Tensor,
               state: torch.Tensor | None, seen: torch.Tensor | None, noise: torch.Tensor | None, **choice):
    """One decode step for the whole batch: the model on each row's last token (B,), then `next_token`."""
    logits = model(input_ids=token[:, None], cache=cache, logits_to_keep=1).logits[:, -1]
    return next_token(logits, finished, state, seen, noise, **choice)


@functools.cache
def compiled_decode_one(cuda: bool):
    """Made once per kind, so a later generate call with the same shapes reuses the compiled graphs; static
    shapes: each model and batch shape gets its own graph (CUDA graphs need them static anyway)."""
    return torch.compile(decode_one, mode="reduce-overhead" if cuda else None, fullgraph=True, dynamic=False)


_last_cache: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Cache]] = weakref.WeakKeyDictionary()


def reused_cache(model: nn.Module, batch: int, max_len: int) -> Cache:
    """The model's cache from its last compiled generate call, emptied, if it has the same shape, dtype and
    device (else a new one, kept for the next call): CUDA graphs are recorded on a cache's addresses."""
    p = next(model.parameters())
    key = (batch, max_len, p.dtype, p.device)
    last = _last_cache.get(model)
    if last is not None and last[0] == key:
        last[1].reset()
        return last[1]
    cache = model.make_cache(batch, max_len)
    _last_cache[model] = key, cache
    return cache


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             seed: int | None = None, return_images: bool = False, compile: bool = False,
             **model_inputs) -> torch.Tensor | Generated:
    """Returns the new tokens (B, T), T <= max_new_tokens; a row that stopped is padded with
    pad_token_id (default: the first stop token) after its stop token. return_images: returns
    `Generated(tokens, images)` with the images each row wrote, decoded to PIL. compile: compiles
    the decode step (see the module docstring); the first call pays the compile time, and the model's
    KV cache is kept for the next call."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, seq) with seq > 0, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    B, S = input_ids.shape
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if not attention_mask.bool().any(1).all():
            raise ValueError("every prompt needs at least one token; a row of attention_mask is all zeros")
        per_token = [k for k in PER_TOKEN_INPUTS if model_inputs.get(k) is not None]
        input_ids, attention_mask, *moved = left_align(input_ids, attention_mask,
                                                       *(model_inputs[k] for k in per_token))
        model_inputs.update(zip(per_token, moved))
    spans = getattr(model, "image_spans", None)
    if return_images and spans is None:
        raise ValueError(f"return_images needs a model that writes images; {type(model).__name__} has no image_spans")
    state = spans.start(input_ids, attention_mask) if spans is not None else None  # (B,) each row's mode
    stop = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if pad_token_id is None:
        pad_token_id = stop[0] if stop else 0
    stop_ids = torch.tensor(stop, dtype=torch.long, device=input_ids.device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)

    cache = reused_cache(model, B, S + max_new_tokens) if compile else model.make_cache(B, S + max_new_tokens)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1,
                   **model_inputs).logits[:, -1]
    seen = None
    if repetition_penalty != 1.0:  # (B, V) tokens already in the sequence; pads are not counted, as in HF
        V = logits.shape[-1]
        ids = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, V)
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device).scatter_(1, ids, True)[:, :V]
    choice = dict(spans=spans, allowed=spans.allowed(logits.shape[-1], logits.device) if spans is not None else None,
                  penalty=repetition_penalty, pad_token_id=pad_token_id,
                  stop_ids=stop_ids if stop else None, do_sample=do_sample, temperature=temperature,
                  top_k=top_k, top_p=top_p)

    def noise() -> torch.Tensor | None:  # drawn outside the step: dynamo does not trace generators
        return exponential_noise(logits, generator) if do_sample else None

    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    token, finished, state, seen = next_token(logits, finished, state, seen, noise(), **choice)
    out = [token]
    step, cuda, every, graphs = decode_one, False, 1, contextlib.nullcontext()
    if compile:
        cuda, every = input_ids.device.type == "cuda", STOP_EVERY
        step = compiled_decode_one(cuda)
        cache.reserve(max_new_tokens - 1)  # the compiled steps' host bookkeeping, all at once
        graphs = torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS)
    with graphs:
        for i in range(1, max_new_tokens):
            if stop and i % every == 0 and bool(finished.all()):
                break
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()
            carry = step(model, cache, token, finished, state, seen, noise(), **choice)
            if cuda:  # the next replay overwrites a CUDA graph's outputs
                carry = [t if t is None else t.clone() for t in carry]
            token, finished, state, seen = carry
            out.append(token)
    tokens = torch.stack(out, dim=1)
    if stop:  # drop the steps run after every row had stopped
        done = torch.isin(tokens, stop_ids).cummax(1).values.all(0)  # (T,)
        if bool(done.any()):
            tokens = tokens[:, :int(done.int().argmax()) + 1]
    if return_images:
        return Generated(tokens, model.images_from_codes(spans.images(input_ids, attention_mask, tokens)))
    return tokens
