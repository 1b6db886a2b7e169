"""Static, preallocated KV cache (gpt-fast style): zero-initialised, written in place at `input_pos`.

`Cache` holds one `KVCache` per attention layer plus the `Segments` of every slot, so a decode
step builds its mask with the same `attention_mask(q, k)` as training and prefill. Cross-attention
K/V (computed once from the media) are kept in `KVCache.set`.
"""

from __future__ import annotations

import torch

from polymodal.nn.masks import Segments


class KVCache:
    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos (S,); k, v (B, nkv, S, hs) -> the whole cache (B, nkv, L, hs)
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class CrossKV:
    """K/V of media for cross-attention: computed once per generate call, then reused."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def set(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        return k, v


class Cache:
    """Everything a model needs to continue a batch of sequences one token at a time."""

    def __init__(self, batch: int, max_len: int, n_layers: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.batch, self.max_len = batch, max_len
        self.layers = [KVCache(batch, max_len, n_kv_heads, head_dim, dtype, device) for _ in range(n_layers)]
        self.cross: dict[int, CrossKV] = {}
        long = dict(dtype=torch.long, device=device)
        self.slots = Segments(
            positions=torch.zeros(batch, max_len, **long),
            groups=torch.zeros(batch, max_len, **long),
            docs=torch.zeros(batch, max_len, **long),
            valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )
        self.length = 0  # slots filled so far (host-side: the engine knows every step's length)

    def cross_kv(self, layer: int) -> CrossKV:
        return self.cross.setdefault(layer, CrossKV())

    def write(self, seg: Segments) -> torch.Tensor:
        """Record the segments of the next S tokens; returns their slot indices `input_pos` (S,)."""
        n = seg.positions.shape[1]
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; it has {self.length} and was given "
                             f"{n} more")
        input_pos = torch.arange(self.length, self.length + n, device=seg.positions.device)
        for name in ("positions", "groups", "docs", "valid"):
            getattr(self.slots, name).index_copy_(1, input_pos, getattr(seg, name))
        self.length += n
        return input_pos

    def next_segments(self, n: int = 1) -> Segments:
        """Segments of n new causal tokens after the last slot (the engine left-pads, so it is valid)."""
        last = self.length - 1
        step = torch.arange(1, n + 1, device=self.slots.positions.device)
        return Segments(
            positions=self.slots.positions[:, last:last + 1] + step,
            groups=self.slots.groups[:, last:last + 1] + step,
            docs=self.slots.docs[:, last:last + 1].repeat(1, n),  # a copy: it is written back into slots
            valid=torch.ones(self.batch, n, dtype=torch.bool, device=step.device),
        )
