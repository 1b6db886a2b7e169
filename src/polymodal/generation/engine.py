"""One generation engine for every family: prefill once, then decode one token at a time.

A model takes part through a small protocol (gpt-fast's split): `model.make_cache(batch, max_len)`
returns a static cache, and `model(input_ids=..., cache=cache, logits_to_keep=1, **media)` is the
prefill (media are encoded here, once) while `model(input_ids=(B, 1), cache=cache, logits_to_keep=1)`
is one decode step. Prompts of different lengths are left-padded (right padding is moved left).

A model that writes images as discrete tokens (Chameleon) also has `model.image_spans`, an
`ImageSpans` state machine that masks each row's logits to its current mode (text, image codes,
image end), and `model.images_from_codes(codes per row)` -> PIL images per row for `return_images`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from polymodal.generation.sampling import apply_repetition_penalty, sample_next

PER_TOKEN_INPUTS = ("token_type_ids", "media_locations")  # model inputs laid out like input_ids, moved with it


class Generated(NamedTuple):
    tokens: torch.Tensor  # (B, T) new tokens
    images: list[list]  # per row, the PIL images it completed, in order


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, *others: torch.Tensor):
    """Move every row's tokens to the right end so padding is on the left (stable within a row)."""
    order = attention_mask.long().argsort(dim=1, stable=True)  # pads (0) first, tokens keep their order
    return tuple(t.gather(1, order) for t in (input_ids, attention_mask, *others))


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             seed: int | None = None, return_images: bool = False, **model_inputs) -> torch.Tensor | Generated:
    """Returns the new tokens (B, T), T <= max_new_tokens; a row that stopped is padded with
    pad_token_id (default: the first stop token) after its stop token. return_images: returns
    `Generated(tokens, images)` with the images each row wrote, decoded to PIL."""
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

    cache = model.make_cache(B, S + max_new_tokens)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1,
                   **model_inputs).logits[:, -1]
    seen = None
    if repetition_penalty != 1.0:  # (B, V) tokens already in the sequence; pads are not counted
        V = logits.shape[-1]
        ids = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, V)
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device).scatter_(1, ids, True)[:, :V]
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = []
    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        if state is not None:
            logits = spans.mask(logits, state)
        token = sample_next(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator)
        token = token.masked_fill(finished, pad_token_id)
        out.append(token)
        if state is not None:
            state = spans.advance(state, token)
        if stop:
            finished |= torch.isin(token, stop_ids)
            if bool(finished.all()):
                break
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        if step + 1 < max_new_tokens:
            logits = model(input_ids=token[:, None], cache=cache, logits_to_keep=1).logits[:, -1]
    tokens = torch.stack(out, dim=1)
    if return_images:
        return Generated(tokens, model.images_from_codes(spans.images(input_ids, attention_mask, tokens)))
    return tokens
