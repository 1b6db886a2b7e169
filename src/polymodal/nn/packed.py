"""Attention for a packed call: many sequences' new tokens concatenated into one row, no padding (the varlen
layout of FlashAttention's `cu_seqlens` and HF's continuous batching's `cumulative_seqlens_q`).

The projections, norms and MLP of a packed call run over (1, T, dim), T the real tokens of every sequence, so
the weights are read once per call however many sequences feed it. Attention stays per sequence: a
`PackedMask` holds the sequences grouped for the one `attend` kernel (sequences of one token together, the
others padded among themselves only), each group's gather index into the packed queries, the pool slots of
its keys and its bool mask (from the `Segments` of the queries and keys, as `masks.attention_mask` builds
every mask). `attend` gathers each group's queries and K/V, runs the kernel, and scatters the rows back.

Shapes: T packed tokens; per group B rows of S queries (padded), L keys; N pool slots; nh / nkv query /
key-value heads, hs head size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def gather_rows(pool: torch.Tensor, index: torch.Tensor, flat: torch.Tensor | None = None) -> torch.Tensor:
    """pool (N, nkv, hs), index (B, L) pool slots (flat: the same, flattened, when made ahead) -> (B, nkv, L, hs)."""
    # index_select, not pool[index]: advanced indexing takes 4x longer on CPU for these shapes
    flat = index.reshape(-1) if flat is None else flat
    return pool.index_select(0, flat).view(*index.shape, *pool.shape[1:]).transpose(1, 2)


@dataclass
class PackedGroup:
    """Rows attended together: query s of row b is packed token q_index[b, s] (a pad repeats a real one; None:
    row b's one query is packed token b, as for decode rows packed first), `keep` the real ones of the flattened
    (B*S) outputs, in packed order (None: every output is real)."""

    q_index: torch.Tensor | None  # (B, S) long
    slot_index: torch.Tensor  # (B, L) long, null-padded
    mask: torch.Tensor  # (B, 1, S, L) bool
    keep: torch.Tensor | None  # (n,) long

    def __post_init__(self) -> None:
        self.flat = self.slot_index.reshape(-1)  # made once for every layer's gathers

    def gather(self, pool: torch.Tensor) -> torch.Tensor:
        return gather_rows(pool, self.slot_index, self.flat)


@dataclass
class PackedMask:
    """The mask of a packed call: its groups, whose kept outputs, concatenated, are the packed tokens in
    `order` (None: in the order of the groups)."""

    groups: list[PackedGroup]
    order: torch.Tensor | None  # (T,) long: packed token t is the order[t]-th of the groups' kept outputs

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kernel: Callable[..., torch.Tensor]) -> torch.Tensor:
        """q (1, nh, T, hs), k/v the pools (N, nkv, hs) the call wrote to -> (1, nh, T, hs), through
        kernel(q, k, v, mask) per group."""
        if len(self.groups) == 1 and self.groups[0].q_index is None:  # a decode call: packed token b is row b's
            g = self.groups[0]  # (1, nh, B, hs) <-> (B, nh, 1, hs), views both ways
            return kernel(q.permute(2, 1, 0, 3), g.gather(k), g.gather(v), g.mask).permute(2, 1, 0, 3)
        out = []
        for g in self.groups:
            if g.q_index is None:  # a view: (nh, B, hs) -> (B, nh, 1, hs)
                q_g = q[0, :, :g.slot_index.shape[0]].transpose(0, 1)[:, :, None]
            else:
                q_g = q[0].index_select(1, g.q_index.reshape(-1)).view(q.shape[1], *g.q_index.shape, q.shape[3])
                q_g = q_g.transpose(0, 1)
            y = kernel(q_g, g.gather(k), g.gather(v), g.mask)  # (B, nh, S, hs)
            y = y.transpose(1, 2).flatten(0, 1)  # (B*S, nh, hs)
            out.append(y if g.keep is None else y.index_select(0, g.keep))
        y = torch.cat(out) if len(out) > 1 else out[0]
        if self.order is not None:
            y = y.index_select(0, self.order)
        return y.transpose(0, 1)[None]
