"""The one attention: self or cross; MHA, GQA, MQA; rotary/xPos/ALiBi/relative; qk-norm; sub-LN; KV cache;
sliding windows in chunks (USM/Conformer local attention), soft-capped scores.

Projections live here; the kernel is `attend(q, k, v, mask)` with backends "sdpa"
(`scaled_dot_product_attention`) and "eager" (the reference the tests compare against), or, with the
"flex" backend, `FlexAttention` over a `masks.block_mask` (the seam PyTorch's context parallel hooks).
Given a `ring_attention.RingMask` (a context-parallel decoder), it attends around the ring of processes; given a
`packed.PackedMask` (a packed call of many sequences in one row), per sequence through the same kernel.
Attention never infers causality: the model builds the mask from `masks.py` and passes it down;
`is_causal=True` is only a fast path the model takes when it has proven the mask is plain causal.

Shapes: B batch, S query length, L key length, nh / nkv query / key-value heads, hs head size.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from torch.nn.attention.flex_attention import BlockMask, flex_attention

from polymodal.errors import InputError
from polymodal.nn.cache import CrossKV, KVCache
from polymodal.nn.masks import LocalWindow
from polymodal.nn.packed import PackedMask
from polymodal.nn.positions import RelativePositionBias, RotaryTables
from polymodal.nn.ring_attention import RingMask, ring_attention

BACKENDS = ("sdpa", "eager", "flex")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
           is_causal: bool = False, scale: float | None = None, dropout: float = 0.0,
           bias: torch.Tensor | None = None, softcap: float | None = None, backend: str = "sdpa") -> torch.Tensor:
    """q (B, nh, S, hs), k/v (B, nkv, L, hs), mask bool or additive float broadcastable to
    (B, nh, S, L) -> (B, nh, S, hs). Any dims between the heads and S are batch dims too (the blocks of a
    `masks.LocalWindow`). bias: float scores added before the soft cap (a relative position term);
    softcap: c * tanh(scores / c) before the mask (Gemma 2, Gemma 3n's audio), computed eagerly."""
    n_rep = q.shape[1] // k.shape[1]
    if backend not in ("sdpa", "eager"):
        raise InputError(f"attend's backend must be 'sdpa' or 'eager' (flex runs through FlexAttention), got {backend!r}")
    if backend == "sdpa" and bias is None and softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                              scale=scale, enable_gqa=n_rep > 1)
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * (scale or 1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores + bias
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if is_causal:
        S, L = scores.shape[-2:]
        mask = torch.ones(S, L, dtype=torch.bool, device=q.device).tril(L - S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = F.dropout(scores.softmax(-1), p=dropout).to(v.dtype)
    return probs @ v


@functools.cache
def compiled_flex_attention():
    """`flex_attention` compiled: the fused kernel (run eagerly, it materialises every score)."""
    return torch.compile(flex_attention)


class FlexAttention(nn.Module):
    """`flex_attention` as a module, so that `nn.context_parallel` can hook its inputs. A query that may
    see no key (a pad) gets zeros. On CUDA it runs compiled (fused) unless a compiled block holds it;
    PyTorch 2.13 runs it eagerly and forward-only on CPU (no backward)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                scale: float | None = None) -> torch.Tensor:
        kernel = compiled_flex_attention() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
        return kernel(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None, *,
                 kv_dim: int | None = None, bias: bool = False, out_bias: bool | None = None,
                 qk_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                 inner_norm: nn.Module | None = None, scale: float | None = None, dropout: float = 0.0,
                 per_dim_scale: bool = False, softcap: float | None = None, rel_pos: RelativePositionBias | None = None,
                 backend: str = "sdpa"):
        """kv_dim: set for cross-attention (keys/values from another stream of that width).
        qk_norm / k_norm: norms over hs applied to q / k per head (Gemma 3, Chameleon, OLMo).
        inner_norm: Magneto's sub-LN before the output projection.
        per_dim_scale: queries scaled by hs**-0.5 * softplus(w) / softplus(0) per dimension, w learned from 0
        (Lingvo's per-dim scale; USM, Gemma 3n's audio). softcap: tanh cap on the scores (`attend`).
        rel_pos: a relative position term added to the scores of a `LocalWindow` (Transformer-XL style)."""
        super().__init__()
        if backend not in BACKENDS:
            raise InputError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        self.head_dim = head_dim or dim // n_heads
        if n_heads % self.n_kv_heads:
            raise InputError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        self.is_cross = kv_dim is not None
        q_out, kv_out = n_heads * self.head_dim, 2 * self.n_kv_heads * self.head_dim
        if self.is_cross:
            self.wq = nn.Linear(dim, q_out, bias=bias)
            self.wkv = nn.Linear(kv_dim, kv_out, bias=bias)
        else:
            self.wqkv = nn.Linear(dim, q_out + kv_out, bias=bias)  # fused: one matmul for q, k, v
        self.wo = nn.Linear(q_out, dim, bias=bias if out_bias is None else out_bias)
        self.q_norm, self.k_norm = qk_norm, k_norm
        self.inner_norm = inner_norm
        self.scale, self.dropout, self.backend = scale, dropout, backend
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim)) if per_dim_scale else None
        self.softcap, self.rel_pos = softcap, rel_pos
        if backend == "flex" and (dropout or self.is_cross or softcap is not None or rel_pos is not None):
            raise InputError("the flex backend is for self-attention without attention dropout, soft cap or "
                             "relative position term")
        self.flex = FlexAttention() if backend == "flex" else None

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:  # (B, S, n*hs) -> (B, n, S, hs)
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                is_causal: bool = False, rope: RotaryTables | None = None,
                cache: KVCache | CrossKV | None = None, input_pos: torch.Tensor | None = None,
                window: LocalWindow | None = None) -> torch.Tensor:
        """x (B, S, dim); kv (B, L, kv_dim) media for cross-attention (None: reuse the cached K/V).
        window: attend within a sliding window, in chunks; the mask is then `window.mask(valid)`."""
        q_size = self.n_heads * self.head_dim
        if self.is_cross:
            q = self._heads(self.wq(x), self.n_heads)
            if kv is None:
                if cache is None or cache.k is None:
                    raise InputError("cross-attention needs media (kv) or K/V cached from an earlier call")
                k, v = cache.k, cache.v
            else:
                k, v = (self._heads(t, self.n_kv_heads) for t in self.wkv(kv).chunk(2, dim=-1))
                k = self.k_norm(k) if self.k_norm is not None else k
                if cache is not None:
                    cache.set(k, v)
            q = self.q_norm(q) if self.q_norm is not None else q
        else:
            qkv = self.wqkv(x)
            kv_size = self.n_kv_heads * self.head_dim
            q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
            q, k, v = self._heads(q, self.n_heads), self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = rope.rotate(q, k)
            if cache is not None:
                k, v = cache.update(input_pos, k, v)
        scale = self.scale
        if self.per_dim_scale is not None:
            q = q * (F.softplus(self.per_dim_scale) * (self.head_dim ** -0.5 / math.log(2.0))).to(q.dtype)
            scale = 1.0
        if window is not None:
            y = self._local(q, k, v, mask, window, scale)
        elif self.rel_pos is not None:
            raise InputError("a relative position term needs a LocalWindow (its distances)")
        elif isinstance(mask, RingMask):
            if self.dropout and self.training:
                raise InputError("ring attention has no attention dropout: build the model with dropout 0")
            y = ring_attention(q, k, v, mask, scale=scale)
        elif isinstance(mask, PackedMask):
            y = mask.attend(q, k, v, functools.partial(attend, scale=scale, softcap=self.softcap, backend=self.backend))
        elif self.flex is not None:
            if not isinstance(mask, BlockMask):
                raise InputError(f"the flex backend needs a masks.block_mask, got {type(mask).__name__}")
            y = self.flex(q, k, v, mask, scale=scale)
        else:
            y = attend(q, k, v, mask, is_causal=is_causal, scale=scale, softcap=self.softcap,
                       dropout=self.dropout if self.training else 0.0, backend=self.backend)
        y = y.transpose(1, 2).reshape(*x.shape[:-1], q_size)  # (B, S, nh*hs)
        if self.inner_norm is not None:
            y = self.inner_norm(y)
        return self.wo(y)

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               window: LocalWindow, scale: float | None) -> torch.Tensor:
        """Sliding-window attention by blocks: (B, nh, S, hs) -> (B, nh, U, W, hs) queries against their
        (B, nkv, U, C, hs) contexts, and back."""
        S = q.shape[-2]
        q_blocks = window.blocks(q)
        bias = None
        if self.rel_pos is not None:
            bias = self.rel_pos(q_blocks, window.distances(q.device), window.left, window.right)
        y = attend(q_blocks, window.contexts(k), window.contexts(v), mask, scale=scale, bias=bias,
                   softcap=self.softcap, dropout=self.dropout if self.training else 0.0, backend=self.backend)
        return window.unblock(y, S)
