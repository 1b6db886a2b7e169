"""Context parallelism for long sequences: attention over a sequence split across processes.

Each process holds one contiguous slice of the sequence (`shard`, `shard_segments`): its queries,
keys, values and their `Segments`, whose positions, groups and documents were counted over the whole
sequence. `context_parallel_attention` all-gathers the keys, values (differentiably: each rank's
key/value gradients flow back to their owner) and key segments, then attends to them one rank's block
at a time, merging each block's partial softmax into the running output through the running row max
and denominator (log-sum-exp merging, as ring attention does; Liu et al. 2023). A block the queries may not see at all (the future, under a causal
mask) is skipped. Which keys a query may see comes from `masks.visible`, the rule one process uses, so
prefix-LM and image blocks, padding and packed documents carry over unchanged.

Only `torch.distributed` collectives are used, so this runs on gloo (CPU) as on NCCL; PyTorch's
`context_parallel` has no CPU kernel. Additive biases (ALiBi) and attention dropout are not supported.

Shapes: B batch, nh / nkv query / key-value heads, S local tokens, W processes, hs head size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from polymodal.nn.masks import Segments, visible
from polymodal.train.distributed import all_gather_with_grad


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x: torch.Tensor, dim: int = 1, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This process's contiguous slice of x along `dim` (the sequence), which must split evenly."""
    rank, world = _world(group)
    if x.shape[dim] % world:
        raise ValueError(f"a sequence of {x.shape[dim]} tokens does not split evenly over {world} processes; "
                         f"pad it to a multiple of {world}")
    return x.chunk(world, dim)[rank]


def shard_segments(seg: Segments, group: dist.ProcessGroup | None = None) -> Segments:
    """The slice of whole-sequence segments (`masks.make_segments` on all tokens) this process holds."""
    return Segments(*(shard(t, 1, group) for t in (seg.positions, seg.groups, seg.docs, seg.valid)))


def gather_segments(seg: Segments, group: dist.ProcessGroup | None = None) -> Segments:
    _, world = _world(group)
    parts = []
    for t in (seg.positions, seg.groups, seg.docs, seg.valid):
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t.contiguous(), group=group)
        parts.append(torch.cat(out, 1))
    return Segments(*parts)


def _gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    # (B, n, S, hs) -> (B, n, W*S, hs), rank order; the gather runs along dim 0, so the sequence goes first
    return all_gather_with_grad(x.permute(2, 0, 1, 3).contiguous(), group).permute(1, 2, 0, 3)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_seg: Segments,
                               k_seg: Segments | None = None, *, scale: float | None = None,
                               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """q (B, nh, S, hs), k/v (B, nkv, S, hs): this process's slices; q_seg / k_seg (default q_seg)
    their segments. Returns (B, nh, S, hs), equal to one process's attention on the whole sequence
    for every query that may see some key (a query that may see none, a pad, gets zeros)."""
    _, world = _world(group)
    k_seg = q_seg if k_seg is None else k_seg
    n_rep = q.shape[1] // k.shape[1]
    keys, values = _gather_sequence(k, group), _gather_sequence(v, group)  # (B, nkv, W*S, hs)
    key_seg = gather_segments(k_seg, group)
    scale = scale or 1.0 / math.sqrt(q.shape[-1])
    S = k.shape[2]
    # flash-attention's running statistics: row max m (held out of autograd: the result does not
    # depend on it), softmax denominator l, unnormalised output acc; never -inf - -inf, so no NaN
    m = torch.full((*q.shape[:3], 1), float("-inf"), device=q.device)  # (B, nh, S, 1)
    l = torch.zeros_like(m)
    acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for j in range(world):
        block = slice(j * S, (j + 1) * S)
        allowed = visible(q_seg, key_seg[:, block])[:, None]  # (B, 1, S, S)
        if not bool(allowed.any()):
            continue
        kj = keys[:, :, block].repeat_interleave(n_rep, dim=1)
        vj = values[:, :, block].repeat_interleave(n_rep, dim=1)
        scores = ((q @ kj.transpose(-2, -1)).float() * scale).masked_fill(~allowed, float("-inf"))
        m_new = torch.maximum(m, scores.detach().amax(-1, keepdim=True))
        m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)  # a row that sees nothing yet
        p = torch.exp(scores - m_safe)  # (B, nh, S, S), 0 where masked
        correction = torch.exp(m - m_safe)
        l = correction * l + p.sum(-1, keepdim=True)
        acc = correction * acc + p @ vj.float()
        m = m_new
    return (acc / l.masked_fill(l == 0, 1.0)).to(q.dtype)
