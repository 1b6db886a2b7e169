"""Flamingo's gated cross-attention dense block (Alayrac et al. 2022, Sec. 2.2 / Fig. 4).

    x = x + tanh(attn_gate) * cross_attn(norm(x), media)
    x = x + tanh(mlp_gate) * mlp(norm(x))

Both gates start at 0, so a fresh block is the identity and the frozen LM it is inserted into starts
out unchanged. A text token attends only to the latest media that started at or before it (the
media-local mask from `masks.media_attention_mask`); a token that has seen no media gets exactly zero
from the cross-attention (its dense part still runs, as in HF `IdeficsGatedCrossAttentionLayer`).

Shapes: B batch, S text tokens, L media tokens (all media of a sample, one after the other).
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.errors import ConfigError
from polymodal.nn.attention import Attention
from polymodal.nn.cache import CrossKV
from polymodal.nn.mlp import make_mlp
from polymodal.nn.norms import make_norm

GATES = ("scalar", "vector")


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, attn: Attention, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module, *,
                 gate_shape: tuple[int, ...] = (1,), dropout: float = 0.0):
        super().__init__()
        if not attn.is_cross:
            raise ConfigError("GatedCrossAttentionBlock needs a cross-attention (Attention with kv_dim)")
        self.attn, self.mlp = attn, mlp
        self.attn_norm, self.mlp_norm = attn_norm, mlp_norm
        self.attn_gate = nn.Parameter(torch.zeros(gate_shape))
        self.mlp_gate = nn.Parameter(torch.zeros(gate_shape))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, media: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                sees_media: torch.Tensor | None = None, cache: CrossKV | None = None) -> torch.Tensor:
        """x (B, S, dim); media (B, L, kv_dim), or None to reuse K/V in `cache`; mask (B, 1, S, L) bool;
        sees_media (B, S) bool, False for tokens that attend to no media (None: no token has media, so
        the cross-attention is skipped)."""
        if sees_media is not None:
            y = self.dropout(self.attn(self.attn_norm(x), media, mask=mask, cache=cache))
            y = y.masked_fill(~sees_media[:, :, None], 0.0)  # exactly zero, whatever the softmax did
            x = x + torch.tanh(self.attn_gate) * y
        return x + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(x))  # the MLP applies its own dropout


def gated_cross_attention_block(dim: int, kv_dim: int, n_heads: int, head_dim: int | None, hidden_dim: int, *,
                                mlp: str = "swiglu", norm: str = "rmsnorm", eps: float = 1e-6,
                                qk_norm: bool = False, gate: str = "scalar", dropout: float = 0.0,
                                backend: str = "sdpa") -> GatedCrossAttentionBlock:
    """gate: "scalar" (one tanh gate per branch, Flamingo) or "vector" (one per channel, Idefics'
    alpha_type="vector"); qk_norm: `norm` over each head of q and k (Idefics 80b)."""
    if gate not in GATES:
        raise ConfigError(f"gate must be one of {list(GATES)}, got {gate!r}")
    head_dim = head_dim or dim // n_heads
    head_norm = (lambda: make_norm(norm, head_dim, eps)) if qk_norm else (lambda: None)
    attn = Attention(dim, n_heads, head_dim=head_dim, kv_dim=kv_dim, qk_norm=head_norm(), k_norm=head_norm(),
                     dropout=dropout, backend=backend)
    return GatedCrossAttentionBlock(attn, make_mlp(mlp, dim, hidden_dim, dropout=dropout), make_norm(norm, dim, eps),
                                    make_norm(norm, dim, eps), gate_shape=(1,) if gate == "scalar" else (1, 1, dim),
                                    dropout=dropout)
