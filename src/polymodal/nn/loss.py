"""Chunked cross-entropy of a linear head: the loss of `h @ weight.T` without the (N, V) logits.

Rows go through in chunks, in forward and again in backward (which recomputes each chunk's logits
from h and the weight, unless one chunk held every row), so memory holds one (chunk, V) block instead
of (N, V): the idea of Liger-Kernel's fused linear cross-entropy and of Cut Cross-Entropy (Wijmans et al. 2024), in plain
PyTorch. Equals `F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-100)`: the mean
over targets that are not -100, log-sum-exp in float32; where every target is -100 (nothing to predict) the
loss is a defined 0 with zero gradients, where `F.cross_entropy` gives NaN.
"""

from __future__ import annotations

import torch

from polymodal.errors import InputError

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2 ** 25  # float32 logits per chunk (128 MiB): 1,024 rows of a 32k vocabulary


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """h (N, d), weight (V, d), targets (N,) -> mean loss over the targets that are not ignored."""
        valid = targets != IGNORE_INDEX
        safe = targets.masked_fill(~valid, 0)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)  # (N,) log-sum-exp per row
        target_logit = torch.empty_like(lse)
        for s in range(0, h.shape[0], chunk_size):
            logits = (h[s:s + chunk_size] @ weight.T).float()  # (c, V)
            lse[s:s + chunk_size] = logits.logsumexp(-1)
            target_logit[s:s + chunk_size] = logits.gather(1, safe[s:s + chunk_size, None]).squeeze(1)
        # one chunk holds every row: keep its logits (within the chunk budget) instead of recomputing them
        kept = logits if 0 < h.shape[0] <= chunk_size else None
        ctx.save_for_backward(h, weight, safe, valid, lse, kept)
        ctx.chunk_size = chunk_size
        return torch.where(valid, lse - target_logit, 0.0).sum() / valid.sum().clamp_min(1)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        h, weight, safe, valid, lse, kept = ctx.saved_tensors
        c = ctx.chunk_size
        # d loss / d logits = (softmax - onehot) * grad / count on valid rows, 0 on ignored ones (as F.cross_entropy,
        # also when every row is ignored)
        row_scale = valid * (grad_loss / valid.sum().clamp_min(1))  # (N,) float32
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], c):
            hc = h[s:s + c]
            if kept is None:
                d = (hc @ weight.T).float().sub_(lse[s:s + c, None]).exp_()  # (c, V) softmax
            else:  # not in place: a second backward (retain_graph) reads it again
                d = kept.sub(lse[:, None]).exp_()
            d[torch.arange(d.shape[0], device=d.device), safe[s:s + c]] -= 1
            d = d.mul_(row_scale[s:s + c, None]).to(h.dtype)
            if grad_h is not None:
                grad_h[s:s + c] = d @ weight
            if grad_w is not None:
                grad_w.add_(d.T @ hc)  # chunks summed in float32
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int | None = None) -> torch.Tensor:
    """h (..., d) states, weight (V, d) the output head, targets (...) ids or -100 -> scalar mean loss.
    chunk_size: rows per chunk (default: CHUNK_ELEMENTS // V). Under autocast the matmuls run in its dtype."""
    if targets.shape != h.shape[:-1]:
        raise InputError(f"targets must have shape {tuple(h.shape[:-1])}, got {tuple(targets.shape)}")
    if torch.is_autocast_enabled(h.device.type):  # a custom Function's backward runs outside autocast: cast here
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    chunk_size = chunk_size or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return ChunkedCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), chunk_size)
