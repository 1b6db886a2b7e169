"""Checkpoint files -> a model at the cost of its weights: built on the meta device, each tensor read from the
memory-mapped files, fused (QKV, gate/up) and cast to the asked dtype straight on the asked device, one at
a time (HF's `from_pretrained` with `low_cpu_mem_usage`, torchtitan's meta init).

A tensor the model keeps exactly as stored (same dtype, CPU) stays a view of the mapped file, as HF's, and
so does a fused one whose parts lie back to back in the file (a layer's gate_proj and up_proj, as safetensors
sorts them); any other is a copy, after which the file's pages of its source are dropped (`Weights.release`),
so peak memory is the model's bytes plus one tensor.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from polymodal.config import check_fits_memory
from polymodal.convert.rules import Rule
from polymodal.errors import InputError
from polymodal.nn.meta import empty, fill, recompute_buffers
from polymodal.nn.quantize import check_mode, quantize_as_loaded
from polymodal.nn.quantize import quantize as quantize_model
from polymodal.serialization import check_fits
from polymodal.weights import SHARDED, SHARDED_MODEL, Weights, check_weight

WORKERS = 2  # threads reading, checking and casting tensors ahead of the one being put in place


def resolve_dtype(dtype: torch.dtype | str | None, weights: Weights | None, declared: object = None) -> torch.dtype:
    """None: float32; "auto": as HF's dtype="auto", the float dtype `declared` (an HF config.json's "dtype"),
    else the checkpoint's own, where float8 (which stores weights but does not compute here) is bfloat16, exact
    for every float8 value; else a float dtype of 16 bits or more."""
    if dtype is None:
        return torch.float32
    if dtype == "auto" and weights is not None:
        named = getattr(torch, declared, None) if isinstance(declared, str) else None
        found = named if isinstance(named, torch.dtype) and named.is_floating_point else weights.float_dtype()
        found = found or torch.float32
        return torch.bfloat16 if found.itemsize == 1 else found
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize == 1:
        raise InputError(f"dtype {dtype} stores weights but does not compute here: load with dtype=torch.bfloat16 "
                         "(exact for float8 weights)")
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise InputError(f"dtype must be a floating torch.dtype, 'auto' or None, got {dtype!r}")


def _tensors(model: nn.Module, weights: Weights, rules: list[Rule], names: dict[str, str], dtype: torch.dtype,
             device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Each rule's tensor, in order: read, checked and cast by `WORKERS` threads, `WORKERS` rules ahead (torch's
    kernels release the GIL, so the page faults of the mapped file and of the new tensors are taken on several
    cores, as HF's loader does); a source only a copy of which is kept is then dropped."""
    def work(rule: Rule) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if device.type == "cpu" and rule.joins():
            view = weights.joined([names[k] for k in rule.theirs], dtype)
            if view is not None:
                return {rule.ours: view}, view
        parts = {k: weights.read(names[k]) for k in rule.theirs}
        value = rule.load(parts, dtype, device)
        _check_cast(value, {names[k]: part for k, part in parts.items()}, weights)
        return parts, value

    with ThreadPoolExecutor(WORKERS) as pool:
        todo = iter(rules)
        pending = deque((rule, pool.submit(work, rule)) for rule in islice(todo, WORKERS))
        while pending:
            rule, done = pending.popleft()
            parts, value = done.result()
            for upcoming in islice(todo, 1):
                pending.append((upcoming, pool.submit(work, upcoming)))
            yield rule.ours, value
            owner, _, name = rule.ours.rpartition(".")
            kept = getattr(model.get_submodule(owner), name).untyped_storage()  # after a quantizer replaced it, too
            for part in parts.values():
                if part.untyped_storage().data_ptr() != kept.data_ptr():
                    weights.release(part)


def _check_cast(value: torch.Tensor, parts: dict[str, torch.Tensor], weights: Weights) -> None:
    """An InputError when casting to a narrower float type (float32 or bfloat16 to float16) turned stored values
    past its range into inf, naming the first such stored tensor; a sum in the new dtype is the cheap first check
    (finite values whose sum overflows are then looked at one by one), as `check_weight`."""
    largest = torch.finfo(value.dtype).max
    if value.is_meta or all(torch.finfo(p.dtype).max <= largest for p in parts.values()) \
            or value.numel() == 0 or math.isfinite(value.sum()):
        return  # a meta tensor holds no values; a widening cast (bfloat16 to float32) cannot overflow
    for name, part in parts.items():
        past = part.abs() > largest
        if bool(past.any()):
            n, biggest = int(past.sum()), part.abs().max().item()
            wider = [str(d) for d in (torch.bfloat16, torch.float32, torch.float64) if torch.finfo(d).max >= biggest]
            raise InputError(f"{weights.where[name]}: tensor {name} holds {n:,} value{'s' if n > 1 else ''} past "
                             f"{value.dtype}'s range ({largest:g}), up to {biggest:g}: cast to {value.dtype} they "
                             f"become inf; load it as {' or '.join(wider)}")


def load_model(build: Callable[[object], nn.Module], cfg, weights: Weights, rules: list[Rule],
               names: dict[str, str], *, dtype: torch.dtype | str | None, device: torch.device | str | None,
               quantize: str | None) -> nn.Module:
    """`build(cfg)` filled from `weights` by `rules` (their names mapped to file keys by `names`), in eval mode.
    The rules are checked against the checkpoint's header and the model's shapes before any data is read."""
    dtype, device = resolve_dtype(dtype, weights), torch.device(device or "cpu")
    if quantize is not None:
        check_mode(quantize, 32, device)
    if device.type == "cpu":
        check_fits_memory(cfg, dtype.itemsize)
    model = empty(lambda: build(cfg))
    for rule in rules:
        rule.check(names)
    shapes = {k: weights.info(names[k])[0] for rule in rules for k in rule.theirs}
    check_fits({k: v.shape for k, v in model.state_dict().items()}, {r.ours: r.shape(shapes) for r in rules},
               weights.directory)
    filled = quantize_as_loaded(model, quantize) if quantize is not None else None
    fill(model, _tensors(model, weights, rules, names, dtype, device), device, filled)
    return model.eval()


def load_polymodal(build: Callable[[object], nn.Module], cfg, directory: str | Path, **options) -> nn.Module:
    """A polymodal checkpoint directory (its keys are the model's own)."""
    weights = Weights(directory)
    keys = weights.keys()
    return load_model(build, cfg, weights, [Rule(k, (k,)) for k in keys], {k: k for k in keys}, **options)


def load_sharded_model(build: Callable[[object], nn.Module], cfg, directory: str | Path, *,
                       dtype: torch.dtype | str | None, device: torch.device | str | None,
                       quantize: str | None) -> nn.Module:
    """The model of a training checkpoint that FSDP processes wrote sharded (`train.checkpoint.save_sharded`),
    put together in this one process by `torch.distributed.checkpoint` (safetensors shards, no pickle)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    dtype = torch.float32 if dtype in (None, "auto") else resolve_dtype(dtype, None)
    device = torch.device(device or "cpu")
    if quantize is not None:
        check_mode(quantize, 32, device)
    if device.type == "cpu":
        check_fits_memory(cfg, dtype.itemsize)
    model = empty(lambda: build(cfg)).to_empty(device=device).to(dtype)
    state = {f"{SHARDED_MODEL}{k}": v for k, v in model.state_dict().items()}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(Path(directory) / SHARDED)),
             no_dist=not torch.distributed.is_initialized())
    for key, value in state.items():
        check_weight(value, key.removeprefix(SHARDED_MODEL), Path(directory) / SHARDED)
    recompute_buffers(model, device)
    return (quantize_model(model, quantize) if quantize else model).eval()
