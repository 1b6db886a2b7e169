"""Context parallelism for long sequences ("LongGemini"): every process keeps one contiguous slice of the
sequence through all the decoder's blocks, and attention still reaches the whole sequence.

This is PyTorch's context parallel (`torch.distributed.tensor.experimental`) in its FlexAttention form,
on a `DeviceMesh`: `_ContextParallel` hooks each `FlexAttention` to all-gather keys and values across
the mesh (differentiably), and each process attends with its rows of a block mask built from
`masks.mask_mod`, so causal text, prefix-LM and image blocks, padding and packed documents carry over
unchanged. Positions are counted over the whole sequence before it is split.

`context_parallel(model, mesh)` switches every decoder in a model (built with backend="flex") over;
the model is then called as before, with the whole sequence on every process, and returns whole-sequence
outputs: the decoder pads the sequence to a multiple of world * 128 tokens (FlexAttention's block rows;
the pads are invisible), keeps its slice, and all-gathers the final hidden states. Slices are not
load-balanced (under a causal mask the last process does the most work).

PyTorch 2.13 limits: SDPA's ring attention has no CPU kernel (`_scaled_dot_product_flash_attention_for_cpu`
has no sharding rule) and FlexAttention has no CPU backward, so on CPU this runs forward only (long-context
prefill and scoring); training through it needs CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.experimental._context_parallel import _context_parallel_shard, _ContextParallel
from torch.distributed.tensor.experimental._context_parallel._attention import _create_cp_block_mask
from torch.distributed.tensor.parallel import parallelize_module
from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE, BlockMask

from polymodal.nn.masks import Segments, mask_mod
from polymodal.train.distributed import all_gather_with_grad


def context_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Splits the sequence of every decoder in `model` over the 1-D `mesh`; returns the model."""
    from polymodal.nn.attention import FlexAttention
    from polymodal.nn.transformer import Decoder

    if mesh.ndim != 1:
        raise ValueError(f"context parallel needs a 1-D device mesh, got {mesh.ndim} dimensions")
    decoders = [m for m in model.modules() if isinstance(m, Decoder)]
    if not decoders or any(d.backend != "flex" for d in decoders):
        raise ValueError("context parallel needs the decoder built with backend='flex', got "
                         f"{[d.backend for d in decoders] or 'no decoder'}")
    for decoder in decoders:
        decoder.context_mesh = mesh
        for module in decoder.modules():
            if isinstance(module, FlexAttention):
                parallelize_module(module, mesh, _ContextParallel(seq_dim=2, attention_type=_ContextParallel.AttentionType.FLEX))
    return model


def shard(mesh: DeviceMesh, x: torch.Tensor, seg: Segments) -> tuple[torch.Tensor, Segments, BlockMask]:
    """The whole sequence's embeddings x (B, S, D) and segments -> this process's slice of both (padded
    to a multiple of world * 128 tokens) and its rows of the block mask."""
    B, S = seg.groups.shape
    unit = mesh.size() * _DEFAULT_SPARSE_BLOCK_SIZE
    pad = -S % unit
    if pad:  # invalid tokens in a document of their own: no one sees them, they see nothing
        x = F.pad(x, (0, 0, 0, pad))
        seg = Segments(F.pad(seg.positions, (0, pad)), F.pad(seg.groups, (0, pad)),
                       F.pad(seg.docs, (0, pad), value=int(seg.docs.min()) - 1), F.pad(seg.valid, (0, pad)))
    # given no load balancer, `_context_parallel_shard` turns load balancing off, which the mask relies on
    x, *parts = _context_parallel_shard(mesh, [x, seg.positions, seg.groups, seg.docs, seg.valid], [1] * 5)
    mask = _create_cp_block_mask(mask_mod(seg, seg), B, 1, S + pad, S + pad, mesh)
    return x, Segments(*parts), mask


def gather(mesh: DeviceMesh, x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Every process's slice x (B, S/W, D) -> the whole sequence (B, seq_len, D); gradients flow back to each slice."""
    whole = all_gather_with_grad(x.transpose(0, 1).contiguous(), mesh.get_group())  # gathers along dim 0
    return whole.transpose(0, 1)[:, :seq_len]
