"""Normalisation layers: LayerNorm, RMSNorm (Zhang & Sennrich 2019) and Gemma's (1 + w) RMSNorm.

RMSNorm computes in float32 and casts back, as HF Llama/Gemma do, so bf16 runs match them.
"""

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.errors import ConfigError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, *, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset  # Gemma stores w and scales by (1 + w)
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma multiplies before the cast back
            return (x32 * (1.0 + self.weight.float())).type_as(x)
        return self.weight * x32.type_as(x)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with an optional bias, computed in the input dtype.

    heads: statistics over the last dim but one affine (weight, bias) of shape (heads, dim) per
    head, for x laid out (..., heads, S, dim): Chameleon's qk-norm, whose model-parallel shards
    each kept their own."""

    def __init__(self, dim: int, eps: float = 1e-5, *, bias: bool = True, heads: int | None = None):
        super().__init__(dim if heads is None else (heads, dim), eps=eps, bias=bias)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.heads is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = F.layer_norm(x, self.normalized_shape[-1:], None, None, self.eps) * self.weight[:, None, :]
        return x + self.bias[:, None, :] if self.bias is not None else x


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "rmsnorm_gemma":
        return RMSNorm(dim, eps, unit_offset=True)
    if kind in ("layernorm", "layernorm_nobias"):
        return LayerNorm(dim, eps, bias=kind == "layernorm")
    raise ConfigError(f"norm must be 'rmsnorm', 'rmsnorm_gemma', 'layernorm' or 'layernorm_nobias', got {kind!r}")
