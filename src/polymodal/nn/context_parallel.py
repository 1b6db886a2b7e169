"""Context parallelism for long sequences ("LongGemini"): every process keeps its share of the sequence
through all the decoder's blocks, and attention still reaches the whole sequence.

`context_parallel(model, mesh)` switches every decoder in a model over to the 1-D `mesh`; the model is then
called as before, with the whole sequence on every process, and returns whole-sequence outputs: the decoder
keeps its share of the embedded sequence, runs its blocks on it, and all-gathers the final hidden states
(differentiably: gradients come back to each share). Positions are counted over the whole sequence before
it is split. Two attentions do the exchange, chosen by the backend the decoder was built with:

- "sdpa" / "eager": ring attention (`nn/ring_attention.py`) on torch.distributed point-to-point, forward
  and backward, on gloo (CPU) and NCCL (CUDA); K/V blocks go round the ring, no process holds the whole
  sequence's K/V. The sequence is padded to whole chunks.
- "flex": PyTorch's context parallel (`torch.distributed.tensor.experimental`) in its FlexAttention form:
  `_ContextParallel` hooks each `FlexAttention` to all-gather keys and values across the mesh, and each
  process attends with its rows of a block mask built from `masks.mask_mod`; the sequence is padded to whole
  128-token blocks per chunk (FlexAttention's block rows). PyTorch 2.13 has no FlexAttention backward on
  CPU, so this path trains on CUDA only (on CPU: forward, for long-context prefill and scoring).

Either way every mask of `masks.py` (causal text, prefix-LM and image blocks, padding, packed documents)
carries over unchanged; the pads added are invisible tokens in a document of their own. With a KV cache
(generation), a decoder split for ring attention runs the whole sequence on every process, as one would.

Load balance: under a causal mask a late token sees many more keys than an early one, so contiguous slices
leave the last process with most of the work (2W-1 times the first's, for W processes). By default the
sequence is cut into 2W chunks and process r keeps chunks r and 2W-1-r (one early, one late), which evens
the work out. The mask rule reads only each token's segment ids, never its index, so the reordered
sequence needs no other change; the gathered outputs are put back in order.

Gradients: each process's parameters get the gradient of the loss it computed through its own tokens, and
the whole-sequence outputs (hence the loss) are the same on every process, so the sum over the mesh of the
processes' gradients is W times the one-process gradient: average them over the mesh (DDP or FSDP2 over
these processes do exactly that), as data-parallel processes that happen to hold the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.experimental._context_parallel import _ContextParallel
from torch.distributed.tensor.parallel import parallelize_module
from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE, BlockMask, create_block_mask

from polymodal.errors import ConfigError
from polymodal.nn.attention import Attention, FlexAttention
from polymodal.nn.collectives import all_gather_with_grad
from polymodal.nn.masks import Segments, mask_mod
from polymodal.nn.positions import ALiBi
from polymodal.nn.ring_attention import RingMask
from polymodal.nn.transformer import Decoder


def context_parallel(model: nn.Module, mesh: DeviceMesh, *, load_balance: bool = True) -> nn.Module:
    """Splits the sequence of every decoder in `model` over the 1-D `mesh`; returns the model.
    load_balance: each process keeps an early and a late chunk (see the module's docstring), else one
    contiguous slice."""
    if mesh.ndim != 1:
        raise ConfigError(f"context parallel needs a 1-D device mesh, got {mesh.ndim} dimensions")
    decoders = [m for m in model.modules() if isinstance(m, Decoder)]
    backends = {d.backend for d in decoders}
    if len(backends) != 1:
        raise ConfigError(f"context parallel needs the model's decoders on one attention backend, got "
                         f"{sorted(backends) or 'no decoder'}")
    ring = backends != {"flex"}
    dropout = [m.dropout for d in decoders for m in d.modules() if isinstance(m, Attention) and m.dropout]
    if ring and dropout:
        raise ConfigError(f"ring attention has no attention dropout: build the model with dropout 0, got {dropout[0]}")
    for decoder in decoders:
        decoder.sequence_split = SequenceSplit(mesh, load_balance, ring)
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
    """How a decoder splits its sequence: over which mesh, in which order, and with which attention (ring
    attention, or else PyTorch's context parallel over FlexAttention)."""
    mesh: DeviceMesh
    load_balance: bool
    ring: bool

    def shard(self, x: torch.Tensor, seg: Segments,
              alibi: ALiBi | None = None) -> tuple[torch.Tensor, Segments, BlockMask | RingMask]:
        """The whole sequence's embeddings x (B, S, D) and segments -> this process's share of both (padded
        to whole chunks) and what its attention takes as the mask."""
        B, S = seg.groups.shape
        world = self.mesh.size()
        chunks = world * (2 if self.load_balance else 1)
        pad = -S % (chunks * (1 if self.ring else _DEFAULT_SPARSE_BLOCK_SIZE))
        if pad:  # invalid tokens in a document of their own: no one sees them, they see nothing
            x = F.pad(x, (0, 0, 0, pad))
            seg = Segments(F.pad(seg.positions, (0, pad)), F.pad(seg.groups, (0, pad)),
                           F.pad(seg.docs, (0, pad), value=int(seg.docs.min()) - 1), F.pad(seg.valid, (0, pad)))
        order = split_order(S + pad, world, self.load_balance, x.device)
        rank = self.mesh.get_local_rank()
        mine = order.view(world, -1)[rank]
        if self.ring:
            mask = RingMask(seg[:, mine], self.mesh.get_group(), alibi)
        else:  # this process's rows of the mask over the whole (reordered) sequence, whose K/V PyTorch gathers
            sees, n = mask_mod(seg[:, order], seg[:, order]), len(mine)
            mask = create_block_mask(lambda b, h, q_idx, kv_idx: sees(b, h, q_idx + rank * n, kv_idx),
                                     B, None, n, S + pad, device=x.device)
        return x[:, mine], seg[:, mine], mask

    def gather(self, x: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Every process's share x (B, n/W, D) -> the whole sequence in its order (B, seq_len, D); gradients
        flow back to each share."""
        whole = all_gather_with_grad(x.transpose(0, 1).contiguous(), self.mesh.get_group()).transpose(0, 1)
        order = split_order(whole.shape[1], self.mesh.size(), self.load_balance, x.device)
        return whole[:, order.argsort()][:, :seq_len]
