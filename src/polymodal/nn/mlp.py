"""Feed-forward blocks: gated (SwiGLU, GeGLU; Shazeer 2020) and plain GELU MLPs.

The gated form keeps gate and up projections in one fused matrix `w_gate_up`.
An optional `inner_norm` is Magneto's sub-LN before the second projection (Wang et al. 2022).
"""

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.errors import ConfigError

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # squared ReLU (So et al. 2021; Persimmon, Fuyu)
}


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, *, gated: bool, activation: str, bias: bool = False,
                 inner_norm: nn.Module | None = None, dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.gated = gated
        self.act = ACTIVATIONS[activation]
        self.w_in = nn.Linear(dim, 2 * hidden_dim if gated else hidden_dim, bias=bias)
        self.inner_norm = inner_norm
        self.w_out = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        if self.inner_norm is not None:
            h = self.inner_norm(h)
        return self.dropout(self.w_out(h))


def make_mlp(kind: str, dim: int, hidden_dim: int, *, bias: bool = False,
             inner_norm: nn.Module | None = None, dropout: float = 0.0) -> MLP:
    """`kind`: "swiglu" (Llama), "geglu" (Gemma, tanh-GELU gate), "gelu" (GPT/ViT), "quick_gelu" (CLIP),
    "relu" (Idefics' perceiver), "relu2" (Persimmon/Fuyu)."""
    gated, activation = {
        "swiglu": (True, "silu"),
        "geglu": (True, "gelu_tanh"),
        "gelu": (False, "gelu"),
        "gelu_tanh": (False, "gelu_tanh"),
        "quick_gelu": (False, "quick_gelu"),
        "relu": (False, "relu"),
        "relu2": (False, "relu2"),
    }[kind]
    return MLP(dim, hidden_dim, gated=gated, activation=activation, bias=bias, inner_norm=inner_norm,
               dropout=dropout)
