"""Static, preallocated KV cache (gpt-fast style): zero-initialised, written in place at `input_pos`.

`Cache` holds one `KVCache` per attention layer plus the `Segments` of every slot, so a decode
step builds its mask with the same `attention_mask(q, k)` as training and prefill. Cross-attention
K/V (computed once from the media) are kept in `CrossKV.set`.

A decode step reads and writes device tensors only (the fill count `fill`, the slots), so it compiles
once and replays as a CUDA graph; the host-side `length` (bounds checks, "prefilled?") is kept by
each write and, for a compiled decode loop, by the engine, once, through `reserve`.

Speculative decoding writes a row's draft tokens and then keeps only the ones accepted, a different
number per row, with one fill for the batch: `rollback` leaves holes (slots nobody sees) where a row
kept fewer tokens than the longest, and `compact` squeezes them out when the cache runs short.

`paged_cache.PagedBatch` follows the same protocol (`length`, `write`, `slots`, `layers[i].update`,
`next_segments`) over a pool of blocks, for a server's many sequences of different lengths.
"""

from __future__ import annotations

import torch

from polymodal.errors import InputError
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
        self.fill = torch.zeros((), **long)  # slots written so far, on the device
        self.length = 0  # slots taken so far (written or reserved), on the host
        self.reserved = False

    def mark_static(self) -> None:
        """For compiled decode steps, which write these in place: CUDA graphs allow that only at fixed addresses.
        Only then, since it imports torch._dynamo (about a second)."""
        for t in (self.fill, *vars(self.slots).values(), *(t for c in self.layers for t in (c.k, c.v))):
            torch._dynamo.mark_static_address(t)

    def cross_kv(self, layer: int) -> CrossKV:
        return self.cross.setdefault(layer, CrossKV())

    def reset(self) -> None:
        """Empties the cache in place: CUDA graphs recorded on its tensors replay on the next batch."""
        for t in (self.fill, *vars(self.slots).values(), *(t for c in self.layers for t in (c.k, c.v))):
            t.zero_()
        self.length, self.reserved = 0, False
        self.cross.clear()

    def _take(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise InputError(f"KV cache holds {self.max_len} tokens; it has {self.length} and was given "
                             f"{n} more")
        self.length += n

    def reserve(self, n: int) -> None:
        """Takes n slots ahead for a compiled decode loop, checked here once: its steps' writes then leave
        the host state alone (a Python int that changed every step would recompile them)."""
        self._take(n)
        self.reserved = True

    def write(self, seg: Segments) -> torch.Tensor:
        """Record the segments of the next S tokens; returns their slot indices `input_pos` (S,)."""
        n = seg.positions.shape[1]
        if not self.reserved:
            self._take(n)
        input_pos = self.fill + torch.arange(n, device=self.fill.device)
        for name in ("positions", "groups", "docs", "valid"):
            getattr(self.slots, name).index_copy_(1, input_pos, getattr(seg, name))
        self.fill += n
        return input_pos

    def next_segments(self, n: int = 1) -> Segments:
        """Segments of n new causal tokens after the last slot (the engine left-pads, so it is valid)."""
        last = (self.fill - 1).view(1)
        step = torch.arange(1, n + 1, device=last.device)
        return Segments(
            positions=self.slots.positions.index_select(1, last) + step,
            groups=self.slots.groups.index_select(1, last) + step,
            docs=self.slots.docs.index_select(1, last).expand(-1, n),
            valid=torch.ones(self.batch, n, dtype=torch.bool, device=last.device),
        )

    def _slot_tensors(self) -> list[tuple[torch.Tensor, int]]:
        """Every per-slot tensor with its slot dimension."""
        return [(t, 1) for t in vars(self.slots).values()] + [(t, 2) for c in self.layers for t in (c.k, c.v)]

    def rollback(self, written: int, kept: torch.Tensor) -> None:
        """Undoes the last `written` slots but each row's first kept[b] of them (kept (B,), 0 <= kept <= written),
        so a row sees what it would have seen given only those tokens. The fill moves back to the longest kept
        run; a row that kept fewer gets holes (not valid) that carry its last position and group on, so its
        next token gets the right ones. Only the slots' segments change: nobody reads the K/V of a slot that
        is not valid, and the next writes replace them."""
        start = self.fill - written
        window = start + torch.arange(written, device=self.fill.device)  # (W,) slot indices
        longest = kept.max()
        hole = torch.arange(written, device=kept.device)[None, :] >= kept[:, None]  # (B, W)
        last = (start + kept - 1)[:, None].expand(-1, written)  # each row's last kept slot (the one before if none)
        for name in ("positions", "groups", "docs"):
            t = getattr(self.slots, name)
            t.index_copy_(1, window, torch.where(hole, t.gather(1, last), t.index_select(1, window)))
        self.slots.valid.index_copy_(1, window, self.slots.valid.index_select(1, window) & ~hole)
        self.fill.copy_(start + longest)
        if not self.reserved:
            self.length -= written - int(longest)

    def compact(self) -> None:
        """Moves each row's valid slots, in order, to the end of the shortest fill that holds them all, with
        the holes in front (as left padding): the rows see the same tokens at the same positions."""
        fill = int(self.fill)
        valid = self.slots.valid[:, :fill]
        keep = int(valid.sum(1).max())
        order = valid.long().argsort(dim=1, stable=True)[:, fill - keep:]  # (B, keep): holes first, then valid in order
        for t, dim in self._slot_tensors():
            index = order if dim == 1 else order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
            moved = t.narrow(dim, 0, fill).gather(dim, index)
            t.narrow(dim, keep, t.shape[dim] - keep).zero_()
            t.narrow(dim, 0, keep).copy_(moved)
        self.fill.fill_(keep)
        if not self.reserved:
            self.length = keep
