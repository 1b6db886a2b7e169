"""Models built without memory and filled from a checkpoint one tensor at a time (the meta-device init of
PyTorch's `torch.device("meta")` + `load_state_dict(assign=True)`, as torchtitan and HF's `from_pretrained`).

`empty(build)` runs a model's constructor on the meta device: shapes only, no allocation, no random init
(`torch.nn.init` and the random fills are skipped there, as HF's `no_init_weights`, and computed buffers are
computed on the CPU: many meta ops run through `torch._refs`, which imports `torch._dynamo` and sympy, about a
second of a load).
`fill` then puts each checkpoint tensor in its place (read, cast and moved one at a time by
`convert.load`), so loading costs the weights' bytes and not a float32 model besides. Buffers that are computed
rather than stored (RoPE frequencies, ALiBi slopes, token-id tables) are `ComputedBuffers`: their module
says how to compute them, and `fill` computes them again on the target device.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from polymodal.errors import CheckpointError


class ComputedBuffers(nn.Module):
    """A module whose buffers are computed from its settings, never saved: `computed()` names them."""

    def computed(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def register_computed(self) -> None:
        device = torch.empty(0).device
        with torch.device("cpu" if device.type == "meta" else device):  # see `empty`; `fill` computes them again
            values = self.computed()
        for name, value in values.items():
            self.register_buffer(name, value.to(device), persistent=False)

    def recompute(self, device: torch.device) -> None:
        with torch.device(device):
            for name, value in self.computed().items():
                self._buffers[name] = value


RANDOM_FILLS = {"normal_", "uniform_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_", "bernoulli_"}
RANDOM_FACTORIES = {torch.randn, torch.rand}


class _NoInit(TorchFunctionMode):
    """Inside `empty`: `torch.nn.init` functions and random fills of a meta tensor return it untouched, and
    random factories give an empty tensor (on the meta device)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RANDOM_FACTORIES and kwargs.get("device") is None:
            return torch.empty(*args, **{k: v for k, v in kwargs.items() if k != "generator"})
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init hands on its tensor by keyword
        name = getattr(func, "__name__", "")
        if isinstance(target, torch.Tensor) and target.is_meta and (
                (getattr(func, "__module__", None) == "torch.nn.init" and name.endswith("_")) or name in RANDOM_FILLS):
            return target
        return func(*args, **kwargs)


def empty(build: Callable[[], nn.Module]) -> nn.Module:
    """The model `build()` makes, on the meta device."""
    with torch.device("meta"), _NoInit():
        return build()


def _place(model: nn.Module, key: str, value: torch.Tensor) -> nn.Module:
    owner_path, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_path)
    if name in owner._parameters:
        old = owner._parameters[name]
        owner._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[name] = value
    return owner


def fill(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], device: torch.device,
         filled: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Puts each (state-dict key, tensor) into the meta `model` as it is (cast and moved by whoever reads it).
    `filled(owner)` runs as each module receives a tensor (to quantize a linear layer as soon as it is
    whole). Every state-dict key must come; computed buffers are then computed on `device`."""
    expected = model.state_dict()
    for key, value in tensors:
        del expected[key]
        owner = _place(model, key, value)
        if filled is not None:
            filled(owner)
    if expected:
        raise CheckpointError(f"the checkpoint left {len(expected)} tensors unset: {sorted(expected)[:10]}")
    recompute_buffers(model, device)
    return model


def recompute_buffers(model: nn.Module, device: torch.device) -> None:
    """Every `ComputedBuffers` module's buffers computed again, on `device` (after a meta init)."""
    for module in model.modules():
        if isinstance(module, ComputedBuffers):
            module.recompute(device)
