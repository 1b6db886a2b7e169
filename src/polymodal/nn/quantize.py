"""Weight-only quantized linear layers for decoding: int8 per output channel, int4 in groups (gpt-fast's
`WeightOnlyInt8Linear` / `WeightOnlyInt4Linear`, the schemes of torchao's `Int8WeightOnlyConfig` and
`Int4WeightOnlyConfig`). Activations stay in the model's float dtype.

int8: w ~ q * scale, q in [-127, 127], one scale per output row (symmetric).
int4: w ~ (q - 8) * scale + zero, q in [0, 15], one (scale, zero) per row and group of `group_size`
inputs (asymmetric; the layout of PyTorch's int4 "tinygemm" kernels); a width that is no multiple of
the group size is padded with zero columns (and rows to a multiple of 16, for the kernel's packing).
int8 widens the weight inside the matmul, as gpt-fast (what `torch.compile` fuses; on the 2-core CPU
measured here that beat PyTorch's `_weight_int8pack_mm`); int4 runs PyTorch's CPU kernel
`_weight_int4pack_mm_for_cpu`, so int4 is CPU only.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.errors import InputError
from polymodal.nn.lora import adapters
from polymodal.nn.transformer import Decoder

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (out,)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)  # the scale applies per output row
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        self.pad = -self.in_features % group_size  # inputs widened with zeros to whole groups
        rows = -self.out_features % 16  # the kernel packs rows in 16s
        w = F.pad(linear.weight.detach().float(), (0, self.pad, 0, rows))
        n, k = w.shape
        groups = w.reshape(n, k // group_size, group_size)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = ((groups - lo) / scale).round().clamp(0, 15).reshape(n, k).to(torch.int32)
        scale_zero = torch.stack([scale, lo + 8 * scale], dim=-1).reshape(n, k // group_size, 2)
        self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(q, 1))  # (n, k / 2) uint8
        self.register_buffer("scale_zero", scale_zero.transpose(0, 1).contiguous())  # (k / group, n, 2)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cpu:
            raise InputError("int4 decoding runs on the CPU only")
        x2 = F.pad(x.reshape(-1, self.in_features), (0, self.pad))
        y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scale_zero.to(x.dtype))
        y = y[:, :self.out_features].reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def check_mode(mode: str, group_size: int, device: torch.device) -> None:
    if mode not in MODES:
        raise InputError(f"quantize must be one of {MODES}, got {mode!r}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise InputError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if mode == "int4" and device.type != "cpu":
        raise InputError("int4 decoding runs PyTorch's CPU int4 kernel: load the model on the CPU")


def quantize_linears(model: nn.Module, paths: list[str], mode: str, group_size: int = 32) -> None:
    """Replace the nn.Linear layers at `paths` with their int8 / int4 versions, in place."""
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        linear = getattr(parent, name)
        check_mode(mode, group_size, linear.weight.device)
        setattr(parent, name, Int8Linear(linear) if mode == "int8" else Int4Linear(linear, group_size))


def decoder_linears(model: nn.Module) -> list[str]:
    """The paths (from `model`) of the language decoder's block linear layers: what `quantize` replaces."""
    decoder = model if isinstance(model, Decoder) else getattr(model, "decoder", None)
    if not isinstance(decoder, Decoder):
        raise InputError(f"quantize reads a language decoder's blocks; a {type(model).__name__} has none")
    if adapters(decoder.layers):
        raise InputError("the decoder has LoRA adapters: merge them into the weights (merge_lora) before quantizing")
    if (found := quantized_layer(decoder.layers)) is not None:  # its float weights are gone: nothing to quantize
        raise InputError(f"the decoder is {found[1]}-quantized already (layers.{found[0]}): quantize the float model")
    prefix = "layers" if decoder is model else "decoder.layers"
    return [f"{prefix}.{path}" for path, m in decoder.layers.named_modules() if isinstance(m, nn.Linear)]


def quantize(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Weight-only quantization of the language decoder's block linear layers (attention and MLP) in place;
    embeddings, norms, the output head and any media encoder stay as they are. For serving:
    `quantize(pm.from_pretrained(dir), "int8")` is `pm.from_pretrained(dir, quantize="int8")`."""
    paths = decoder_linears(model)
    check_mode(mode, group_size, next(model.parameters()).device)
    quantize_linears(model, paths, mode, group_size)
    return model


def quantize_as_loaded(model: nn.Module, mode: str, group_size: int = 32) -> Callable[[nn.Module], None]:
    """A `meta.fill` callback: each decoder linear layer of the meta `model` is quantized as soon as its last
    tensor is loaded, so no float copy of the whole decoder is ever held."""
    pending = {id(model.get_submodule(p)): p for p in decoder_linears(model)}

    def filled(owner: nn.Module) -> None:
        path = pending.get(id(owner))
        if path is not None and not any(t.is_meta for t in owner.parameters()):
            quantize_linears(model, [pending.pop(id(owner))], mode, group_size)

    return filled


def quantized_layer(model: nn.Module) -> tuple[str, str] | None:
    """(path, mode) of the model's first quantized layer, or None."""
    for path, m in model.named_modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            return path, "int8" if isinstance(m, Int8Linear) else "int4"
    return None


def check_not_quantized(model: nn.Module) -> None:
    """An InputError before a model with quantized layers is written as a checkpoint: their integer weights
    and scales would be written where float weights belong, a file no loader (polymodal's or HF's) reads back."""
    if (found := quantized_layer(model)) is not None:
        path, mode = found
        raise InputError(f"cannot save a quantized model as a checkpoint: {path} is {mode}-quantized: save the "
                         f"float model and load it with quantize='{mode}'")


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (each storage once: tied weights count once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
