"""Collectives that autograd can see through, over `torch.distributed` (gloo on CPU, NCCL on CUDA): a ring
shift (point-to-point, overlapped with compute) and an all-gather whose gradient returns to each rank.
Used by ring attention, context parallel and the contrastive loss across processes."""

from __future__ import annotations

import torch
import torch.distributed as dist


def ring_shift(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, list]:
    """Start sending `tensor` to the next rank of the ring and receiving the previous rank's (same
    shape and dtype). Returns the receive buffer and the requests to `wait()` on, so the caller can
    compute while the tensors travel (ring attention, the chunked SigLIP loss's ring)."""
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), dist.get_global_rank(group, (rank + 1) % world), group),
           dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - 1) % world), group)]
    return received, dist.batch_isend_irecv(ops)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group, ctx.rows = group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # every rank used every rank's rows: the owner's gradient is the sum over ranks of its slice
        # (an all-reduce rather than a reduce-scatter, which gloo lacks)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(0, dist.get_rank(ctx.group) * ctx.rows, ctx.rows), None


def all_gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's `x` (same shape on all ranks) concatenated along dim 0 in rank order; gradients
    flow back to each rank's own `x`, summed over all ranks' uses."""
    return _AllGatherWithGrad.apply(x, group)
