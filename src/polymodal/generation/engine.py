"""One generation engine for every family: prefill once, then decode one token at a time.

A model takes part through the `LanguageModel` protocol (`nn/language_model.py`, gpt-fast's split):
`model.make_cache(batch, max_len)` returns a static cache, `model.prefill(input_ids, cache, **media)` runs
the prompt (media are encoded there, once) and `model.decode(input_ids (B, 1), cache)` is one decode step;
`model.text_config` gives the vocabulary and the context. What a family lays out like input_ids (and so
moves with it) is its spec's `per_token_inputs`. Prompts of different lengths are left-padded (right
padding is moved left). Each step's token is chosen by the one `Chooser` (`choice.py`).

A model that writes images as discrete tokens also has `model.image_spans`, an `ImageSpans` state
machine that masks each row's logits to its current mode (text, image codes, image end), and
`model.images_from_codes(codes per row)` -> PIL images per row for `return_images`.

`compile=True` runs `decode_one` (the model on each row's last token, then the chooser) through
`torch.compile`, as CUDA graphs on CUDA; prefill and media encoding stay eager and run once. Sampling noise is drawn outside the step, so a seed gives the same tokens either way. The
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

from polymodal.errors import InputError, check_number
from polymodal.generation import speculative
from polymodal.families import spec_of
from polymodal.generation.choice import Chooser
from polymodal.generation.prompts import check_context, check_vocabulary, has_media
from polymodal.generation.sampling import exponential_noise
from polymodal.nn.cache import Cache
from polymodal.nn.language_model import LanguageModel

TOKEN_DTYPES = (torch.long, torch.int32)  # not uint8 (wraps at 256) nor bool; floats are not ids
STOP_EVERY = 8  # compiled decoding reads the stop flags (a host sync) once per this many steps
MAX_GRAPHS = 64  # compiled decode steps kept: one per model kind, shape and sampling setup (dynamo's default: 8)


class Generated(NamedTuple):
    tokens: torch.Tensor  # (B, T) new tokens
    images: list[list]  # per row, the PIL images it completed, in order


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, *others: torch.Tensor):
    """Move every row's tokens to the right end so padding is on the left (stable within a row)."""
    order = attention_mask.long().argsort(dim=1, stable=True)  # pads (0) first, tokens keep their order
    return tuple(t.gather(1, order.view(*order.shape, *[1] * (t.dim() - 2)).expand_as(t))
                 for t in (input_ids, attention_mask, *others))


def decode_one(model: LanguageModel, cache: Cache, token: torch.Tensor, finished: torch.Tensor,
               state: torch.Tensor | None, seen: torch.Tensor | None, noise: torch.Tensor | None, chooser: Chooser):
    """One decode step for the whole batch: the model on each row's last token (B,), then `Chooser.choose`."""
    logits = model.decode(token[:, None], cache).logits[:, -1]
    return chooser.choose(logits, finished, state, seen, noise)


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
    cache.mark_static()
    _last_cache[model] = key, cache
    return cache


def check_settings(model: nn.Module, input_ids, attention_mask, *, max_new_tokens, do_sample, temperature, top_k,
                   top_p, repetition_penalty, eos_token_id, pad_token_id, seed, frequency_penalty=0.0,
                   presence_penalty=0.0, media: bool = False) -> None:
    """Every generate argument checked before any compute: one line naming what was expected and given."""
    if not isinstance(model, LanguageModel):
        raise InputError(f"generate needs a model that writes tokens; a {type(model).__name__} writes nothing")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in TOKEN_DTYPES:
        given = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise InputError(f"input_ids must be a tensor of integer token ids (torch.long or int32), got {given}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids must be (batch, seq) with seq > 0, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise InputError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    check_number("max_new_tokens", max_new_tokens, integer=True, at_least=1)
    if do_sample:
        check_number("temperature", temperature, above=0)
    else:  # unused by greedy decoding, but still a number (0 is how some APIs spell greedy)
        check_number("temperature", temperature, at_least=0)
    check_number("repetition_penalty", repetition_penalty, above=0)
    check_number("frequency_penalty", frequency_penalty, at_least=-2, at_most=2)  # OpenAI's range
    check_number("presence_penalty", presence_penalty, at_least=-2, at_most=2)
    if top_k is not None:
        check_number("top_k", top_k, integer=True, at_least=1)
    if top_p is not None:
        check_number("top_p", top_p, above=0, at_most=1)
    if seed is not None:
        check_number("seed", seed, integer=True, at_least=0, below=2 ** 64)  # torch.Generator's range
    text = model.text_config
    check_context(input_ids.shape[-1], max_new_tokens, text.max_seq_len, media=media)
    V = text.vocab_size
    stop = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    for name, ids in (("eos_token_id", stop), ("pad_token_id", [pad_token_id])):
        for i in ids:
            if i is not None:
                check_number(name, i, integer=True, at_least=0, below=V)
    check_vocabulary(input_ids, V)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if not attention_mask.bool().any(1).all():
            raise InputError("every prompt needs at least one token; a row of attention_mask is all zeros")


def check_logits(model: nn.Module, logits: torch.Tensor) -> None:
    """An InputError when the logits after the prompt (B, V) hold NaN or +inf (-inf only rules a token out): greedy
    decoding would write token 0 at every step (the argmax of NaN) and return it as an answer, sampling would draw
    from NaN probabilities. One host sync per generate call."""
    bad = (torch.isnan(logits) | torch.isposinf(logits)).any(-1)
    if bool(bad.any()):
        dtype = next(model.parameters()).dtype
        hint = "; load it in bfloat16 or float32" if dtype == torch.float16 else ""
        raise InputError(f"the model's logits after the prompt hold NaN or inf (rows {bad.nonzero().flatten().tolist()}"
                         f"): its {dtype} activations overflowed or its weights hold NaN{hint}")


def in_eval_mode(fn):
    """Runs `fn(model, ..., assistant_model=...)` with both models in eval mode (dropout off: decoding is
    deterministic whatever mode a model was left in), each module's mode restored after."""
    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args, **kwargs):
        modules = [m for root in (model, kwargs.get("assistant_model")) if root is not None for m in root.modules()]
        modes = [m.training for m in modules]
        for m in modules:
            m.training = False
        try:
            return fn(model, *args, **kwargs)
        finally:
            for m, mode in zip(modules, modes):
                m.training = mode
    return wrapper


@in_eval_mode
@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             frequency_penalty: float = 0.0, presence_penalty: float = 0.0, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             seed: int | None = None, return_images: bool = False, compile: bool = False,
             assistant_model: nn.Module | None = None, num_assistant_tokens: int | None = None,
             prompt_lookup_num_tokens: int | None = None, **model_inputs) -> torch.Tensor | Generated:
    """Returns the new tokens (B, T), T <= max_new_tokens; a row that stopped is padded with
    pad_token_id (default: the first stop token) after its stop token. return_images: returns
    `Generated(tokens, images)` with the images each row wrote, decoded to PIL. compile: compiles
    the decode step (see the module docstring); the first call pays the compile time, and the model's
    KV cache is kept for the next call. assistant_model (a draft model with the target's vocabulary; default
    num_assistant_tokens=5) or prompt_lookup_num_tokens: speculative decoding (`speculative`), the same
    tokens as without it when greedy, the same distribution when sampling. frequency_penalty and presence_penalty:
    OpenAI's, in [-2, 2], on the tokens written so far (the prompt's are not counted), after the repetition
    penalty (HF's, which counts the prompt's)."""
    check_settings(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                   temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed,
                   frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                   media=has_media(model, model_inputs))
    if return_images and model.image_spans is None:
        raise InputError(f"return_images needs a model that writes images; {type(model).__name__} has no image_spans")
    drafting = speculative.plan(model, assistant_model, num_assistant_tokens, prompt_lookup_num_tokens, model_inputs)
    input_ids, attention_mask = aligned(model, input_ids.long(), attention_mask, model_inputs)
    chooser = Chooser.make(model, device=input_ids.device, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                           repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                           presence_penalty=presence_penalty, do_sample=do_sample, temperature=temperature,
                           top_k=top_k, top_p=top_p)
    generator = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    B, S = input_ids.shape
    new_cache = reused_cache if compile else lambda m, batch, max_len: m.make_cache(batch, max_len)
    max_len = S + max_new_tokens + (drafting.headroom if drafting is not None else 0)
    cache = new_cache(model, B, max_len)
    logits = model.prefill(input_ids, cache, attention_mask=attention_mask, **model_inputs).logits[:, -1]
    check_logits(model, logits)
    noise = (lambda: exponential_noise(logits, generator)) if do_sample else (lambda: None)
    state, seen = chooser.start(input_ids, attention_mask, logits.shape[-1])
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    first = chooser.choose(logits, finished, state, seen, noise())
    if drafting is not None:
        draft_cache = new_cache(drafting.assistant, B, max_len) if drafting.assistant else None
        with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS):
            tokens = speculative.decode(drafting, model, cache, draft_cache, input_ids, attention_mask, model_inputs,
                                        *first, chooser, max_new_tokens=max_new_tokens, generator=generator,
                                        compile=compile)
    else:
        tokens = decode(model, cache, first, chooser, noise, max_new_tokens=max_new_tokens, compile=compile)
    tokens = trimmed(tokens, chooser)
    if return_images:
        return Generated(tokens, images_written(model, input_ids, attention_mask, tokens))
    return tokens


def aligned(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, model_inputs: dict):
    """The prompts with their padding moved left, and the model inputs laid out like them (the family's
    per-token inputs) moved with them, in model_inputs."""
    if attention_mask is None:
        return input_ids, None
    per_token = [k for k in spec_of(model).per_token_inputs if model_inputs.get(k) is not None]
    input_ids, attention_mask, *moved = left_align(input_ids, attention_mask, *(model_inputs[k] for k in per_token))
    model_inputs.update(zip(per_token, moved))
    return input_ids, attention_mask


def decode(model: LanguageModel, cache: Cache, first: tuple, chooser: Chooser, noise, *, max_new_tokens: int,
           compile: bool) -> torch.Tensor:
    """The tokens (B, T) from the first one on, one decode step at a time, until max_new_tokens or until every
    row stopped (read every step eager, every STOP_EVERY compiled)."""
    token, finished, state, seen = first
    out = [token]
    step, cuda, every, graphs = decode_one, False, 1, contextlib.nullcontext()
    if compile:
        cuda, every = token.device.type == "cuda", STOP_EVERY
        step = compiled_decode_one(cuda)
        cache.reserve(max_new_tokens - 1)  # the compiled steps' host bookkeeping, all at once
        graphs = torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS)
    stops = chooser.stop_ids is not None
    with graphs:
        for i in range(1, max_new_tokens):
            if stops and i % every == 0 and bool(finished.all()):
                break
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()
            carry = step(model, cache, token, finished, state, seen, noise(), chooser)
            if cuda:  # the next replay overwrites a CUDA graph's outputs
                carry = [t if t is None else t.clone() for t in carry]
            token, finished, state, seen = carry
            out.append(token)
    return torch.stack(out, dim=1)


def trimmed(tokens: torch.Tensor, chooser: Chooser) -> torch.Tensor:
    """tokens (B, T) without the steps run after every row had stopped."""
    if chooser.stop_ids is not None:
        done = chooser.stops(tokens).cummax(1).values.all(0)  # (T,)
        if bool(done.any()):
            tokens = tokens[:, :int(done.int().argmax()) + 1]
    return tokens


def images_written(model: LanguageModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   tokens: torch.Tensor) -> list[list]:
    """The PIL images each row completed in its new tokens (B, T) after its prompt (B, S), in order."""
    return model.images_from_codes(model.image_spans.images(input_ids, attention_mask, tokens))
