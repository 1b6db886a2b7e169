"""Context parallelism for long sequences ("LongGemini"): every process keeps one contiguous slice of the
sequence through all the decoder's blocks, and attention still reaches the whole sequence.

This is PyTorch's context parallel (`torch.distributed.tensor.experimental`) in its FlexAttention form,
on a `DeviceMesh`: `_ContextParallel` hooks each `FlexAttention` to all-gather keys and values across
the mesh (differentiably), and each process attends with its rows of a block mask built from
`masks.mask_mod`, so causal text, prefix-LM and image blocks, padding and packed documents carry over
unchanged. Positions are counted over the whole sequence before it is split.

`context_parallel(model, mesh)` switches every decoder in a model (built with backend="flex") over;
the model is then called as before, with the whole sequence on every process, and returns whole-sequence
outputs: the decoder pads the sequence to whole 128-token blocks per slice (FlexAttention's block rows;
the pads are invisible), keeps its slice, and all-gathers the final hidden states.

Load balance: under a causal mask a late token sees many more keys than an early one, so contiguous slices
leave the last process with most of the work (2W-1 times the first's, for W processes). By default the
sequence is cut into 2W chunks and process r keeps chunks r and 2W-1-r (one early, one late), which evens
the work out. The mask rule reads only each token's segment ids, never its index, so the reordered
sequence needs no other change; the gathered outputs are put back in order.

PyTorch 2.13 limits: SDPA's ring attention has no CPU kernel (`_scaled_dot_product_flash_attention_for_cpu`
has no sharding rule) and FlexAttention has no CPU backward, so on CPU this runs forward only (long-context
prefill and scoring); training through it needs CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def context_parallel(model: nn.Module, mesh: DeviceMesh, *, load_balance: bool = True) -> nn.Module:
    """Splits the sequence of every decoder in `model` over the 1-D `mesh`; returns the model.
    load_balance: each process keeps an early and a late chunk (see the module's docstring), else one
    contiguous slice."""
    from polymodal.nn.attention import FlexAttention
    from polymodal.nn.transformer import Decoder

    if mesh.ndim != 1:
        raise ValueError(f"context parallel needs a 1-D device mesh, got {mesh.ndim} dimensions")
    decoders = [m for m in model.modules() if isinstance(m, Decoder)]
    if not decoders or any(d.backend != "flex" for d in decoders):
        raise ValueError("context parallel needs the decoder built with backend='flex', got "
                         f"{[d.backend for d in decoders] or 'no decoder'}")
    for decoder in decoders:
        decoder.sequence_split = SequenceSplit(mesh, load_balance)
        for module in decoder.modules():
            if isinstance(module, FlexAttention):
                parallelize_module(module, mesh, _ContextParallel(seq_dim=2, attention_type=_ContextParallel.AttentionType.FLEX))
    return model


def split_order(n: int, world: int, load_balance: bool, device: torch.device | None = None) -> torch.Tensor:
    """(n,) the token of the padded sequence that each place of the split sequence holds; process r keeps
    places [r * n/world, (r+1) * n/world). Balanced, that is chunks r and 2*world-1-r of 2*world."""
    index = torch.arange(n, device=device)
    if not load_balance:
        return index
    chunks = index.view(2 * world, -1)
    return torch.cat([torch.cat((chunks[r], chunks[2 * world - 1 - r])) for r in range(world)])


@dataclass(frozen=True)
class SequenceSplit:
    """How a decoder splits its sequence: over which mesh, and in which order."""
    mesh: DeviceMesh
    load_balance: bool

    def shard(self, x: torch.Tensor, seg: Segments) -> tuple[torch.Tensor, Segments, BlockMask]:
        """The whole sequence's embeddings x (B, S, D) and segments -> this process's share of both (padded
        to whole 128-token blocks per chunk) and its rows of the block mask."""
        B, S = seg.groups.shape
        chunks = self.mesh.size() * (2 if self.load_balance else 1)
        pad = -S % (chunks * _DEFAULT_SPARSE_BLOCK_SIZE)
        if pad:  # invalid tokens in a document of their own: no one sees them, they see nothing
            x = F.pad(x, (0, 0, 0, pad))
            seg = Segments(F.pad(seg.positions, (0, pad)), F.pad(seg.groups, (0, pad)),
                           F.pad(seg.docs, (0, pad), value=int(seg.docs.min()) - 1), F.pad(seg.valid, (0, pad)))
        order = split_order(S + pad, self.mesh.size(), self.load_balance, x.device)
        x, seg = x[:, order], seg[:, order]
        # given no load balancer, `_context_parallel_shard` cuts contiguous slices (the reordering is ours)
        x, *parts = _context_parallel_shard(self.mesh, [x, seg.positions, seg.groups, seg.docs, seg.valid], [1] * 5)
        mask = _create_cp_block_mask(mask_mod(seg, seg), B, 1, S + pad, S + pad, self.mesh)
        return x, Segments(*parts), mask

    def gather(self, x: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Every process's share x (B, n/W, D) -> the whole sequence in its order (B, seq_len, D); gradients
        flow back to each share."""
        whole = all_gather_with_grad(x.transpose(0, 1).contiguous(), self.mesh.get_group()).transpose(0, 1)
        order = split_order(whole.shape[1], self.mesh.size(), self.load_balance, x.device)
        return whole[:, order.argsort()][:, :seq_len]
