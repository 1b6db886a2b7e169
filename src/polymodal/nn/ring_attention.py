"""Ring attention (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context"), forward and backward, on `torch.distributed` point-to-point messages (gloo on CPU, NCCL on CUDA).

The sequence is split over the W processes of a group. Each process keeps its queries; the keys and values
travel around the ring one block per step, with their tokens' segment ids so that the one mask rule of
`masks.py` applies to them, and the next block is on its way while the current one is computed. Each block's
result is merged into the running output by an online softmax over the log-sum-exp (flash attention's
merge). The backward pass (a custom autograd.Function) sends K/V around again together with their dK/dV, so
each key's and value's gradient comes home after W steps. No process holds more than two K/V blocks, nor
more than one tile of scores.

Within a step, queries and keys are cut into tiles of `TILE` tokens, and a tile pair that the mask rules out
entirely (later tokens under a causal mask, another packed document, padding) is skipped: neither computed
nor masked. A query that may see no key (a pad) gets zeros.

Shapes: B batch, k kv heads, r query heads per kv head, q queries, t keys, d head size (einsum letters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from polymodal.nn.collectives import ring_shift
from polymodal.nn.masks import Segments, visible
from polymodal.nn.positions import ALiBi

TILE = 512  # tokens per query / key tile: bounds the scores held at once to (B, heads, TILE, TILE)


@dataclass(frozen=True)
class RingMask:
    """What a context-parallel decoder passes its attention instead of a mask: this process's tokens'
    segments, the group that holds the rest of the sequence, and ALiBi when the decoder uses it."""
    segments: Segments
    group: dist.ProcessGroup
    alibi: ALiBi | None = None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: RingMask,
                   scale: float | None = None) -> torch.Tensor:
    """This process's share: q (B, nh, S, hs), k/v (B, nkv, S, hs) -> (B, nh, S, hs), attending over the
    keys of every process of `mask.group` that the mask rule lets each query see."""
    return _RingAttention.apply(q, k, v, mask, scale or q.shape[-1] ** -0.5)


def _pack(seg: Segments) -> torch.Tensor:  # (4, B, S): one message
    return torch.stack((seg.positions, seg.groups, seg.docs, seg.valid.long()))


def _unpack(t: torch.Tensor) -> Segments:
    return Segments(t[0], t[1], t[2], t[3].bool())


def _ring(group: dist.ProcessGroup, *tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yields this process's `tensors`, then the previous rank's, and so on round the ring (W in all);
    the next ones travel while the caller computes on the current ones."""
    world = dist.get_world_size(group)
    for step in range(world):
        incoming = [ring_shift(t, group) for t in tensors] if step < world - 1 else []
        yield tensors
        tensors = tuple(_arrived(*shift) for shift in incoming)


def _visible_tiles(q_seg: Segments, k_seg: Segments) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """(query tile, key tile, which queries see which keys (B, q, t)) for every tile pair not ruled out."""
    (_, S), L = q_seg.groups.shape, k_seg.groups.shape[1]
    for i in range(0, S, TILE):
        for j in range(0, L, TILE):
            qs, ks = slice(i, i + TILE), slice(j, j + TILE)
            sees = visible(q_seg[:, qs], k_seg[:, ks])
            if sees.any():
                yield qs, ks, sees


def _scores(q: torch.Tensor, k: torch.Tensor, sees: torch.Tensor, q_seg: Segments, k_seg: Segments,
            alibi: ALiBi | None, scale: float) -> torch.Tensor:
    """q (B, k, r, q, d), k (B, k, t, d) tiles -> float32 scores (B, k, r, q, t), -inf where not seen."""
    s = torch.einsum("bkrqd,bktd->bkrqt", q, k).float() * scale
    if alibi is not None:
        s = s + alibi.bias(q_seg.positions, k_seg.positions).view_as(s)
    return s.masked_fill(~sees[:, None, None], float("-inf"))


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """A row that has seen no key yet has lse -inf; subtracting 0 instead keeps its weights exp(-inf) = 0."""
    return lse.masked_fill(lse.isinf(), 0.0)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask: RingMask, scale: float):
        q5 = q.unflatten(1, (k.shape[1], -1))  # (B, k, r, S, d): query head h uses kv head h // r
        out = torch.zeros(q5.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q5.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        q_seg = mask.segments
        for packed, kv in _ring(mask.group, _pack(q_seg), torch.stack((k, v))):
            k_seg = _unpack(packed)
            for qs, ks, sees in _visible_tiles(q_seg, k_seg):
                s = _scores(q5[..., qs, :], kv[0][:, :, ks], sees, q_seg[:, qs], k_seg[:, ks], mask.alibi, scale)
                new_lse = torch.logaddexp(lse[..., qs], s.logsumexp(-1))
                p = torch.exp(s - _finite(new_lse)[..., None])  # weights under everything seen so far
                rescale = torch.exp(lse[..., qs] - _finite(new_lse))[..., None]
                out[..., qs, :] = out[..., qs, :] * rescale + torch.einsum("bkrqt,bktd->bkrqd", p, kv[1][:, :, ks].float())
                lse[..., qs] = new_lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale = mask, scale
        return out.flatten(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        mask, scale, group = ctx.mask, ctx.scale, ctx.mask.group
        q5 = q.unflatten(1, (k.shape[1], -1))
        d_out = grad_out.unflatten(1, q5.shape[1:3]).float()
        delta = (d_out * out).sum(-1)  # (B, k, r, S): rowsum(dO * O), the softmax backward's correction
        lse = _finite(lse)
        dq = torch.zeros(q5.shape, dtype=torch.float32, device=q.device)
        q_seg, sending = mask.segments, None
        for packed, kv in _ring(group, _pack(q_seg), torch.stack((k, v))):
            k_seg = _unpack(packed)
            d_kv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # this block's (dK, dV) from here
            for qs, ks, sees in _visible_tiles(q_seg, k_seg):
                k_tile, v_tile = kv[0][:, :, ks].float(), kv[1][:, :, ks].float()
                s = _scores(q5[..., qs, :], kv[0][:, :, ks], sees, q_seg[:, qs], k_seg[:, ks], mask.alibi, scale)
                p = torch.exp(s - lse[..., qs, None])
                d_kv[1][:, :, ks] += torch.einsum("bkrqt,bkrqd->bktd", p, d_out[..., qs, :])
                dp = torch.einsum("bkrqd,bktd->bkrqt", d_out[..., qs, :], v_tile)
                ds = p * (dp - delta[..., qs, None]) * scale
                dq[..., qs, :] += torch.einsum("bkrqt,bktd->bkrqd", ds, k_tile)
                d_kv[0][:, :, ks] += torch.einsum("bkrqt,bkrqd->bktd", ds, q5[..., qs, :].float())
            if sending is not None:  # what the processes before this one added to this block's gradients
                d_kv += _arrived(*sending)
            sending = ring_shift(d_kv, group) if dist.get_world_size(group) > 1 else (d_kv, [])
        d_kv = _arrived(*sending)  # W steps on, each block's gradients are back with its owner
        return dq.flatten(1, 2).to(q.dtype), d_kv[0].to(k.dtype), d_kv[1].to(v.dtype), None, None


def _arrived(tensor: torch.Tensor, requests: list) -> torch.Tensor:
    for request in requests:
        request.wait()
    return tensor
