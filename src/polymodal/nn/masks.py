"""One mask system: every attention mask comes from per-token segment ids.

Each token carries four ids (a `Segments`):
  positions  its position (reset per packed document, pads not counted)
  groups     token i may see token j iff groups[j] <= groups[i]; strictly increasing groups give
             a causal mask, equal groups a bidirectional block (a prefix, an image)
  docs       packed document id: tokens only see their own document
  valid      False for padding: nobody sees a pad

`attention_mask(q, k)` is the only place these become a mask, for training, prefill and cached
decode alike (the cache keeps the `Segments` of its slots). This is big_vision's
`cumsum(mask_ar)` construction (PaliGemma) extended with documents and padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segments:
    positions: torch.Tensor  # (B, S) long
    groups: torch.Tensor  # (B, S) long
    docs: torch.Tensor  # (B, S) long
    valid: torch.Tensor  # (B, S) bool

    def __getitem__(self, index) -> Segments:
        return Segments(self.positions[index], self.groups[index], self.docs[index], self.valid[index])


def make_segments(batch: int, seq: int, device: torch.device, *,
                  attention_mask: torch.Tensor | None = None,
                  document_ids: torch.Tensor | None = None,
                  block_ids: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None) -> Segments:
    """Segments for a (batch, seq) input.

    attention_mask: (B, S) 1 for tokens, 0 for padding.
    document_ids:   (B, S) packed document ids (any integers; a change starts a new document).
    block_ids:      (B, S) 0 for causal tokens; runs of one nonzero id form a bidirectional block.
    position_ids:   (B, S) explicit positions; by default counted per document over valid tokens.
    """
    valid = (torch.ones(batch, seq, dtype=torch.bool, device=device) if attention_mask is None
             else attention_mask.to(device=device, dtype=torch.bool))
    docs = (torch.zeros(batch, seq, dtype=torch.long, device=device) if document_ids is None
            else document_ids.to(device=device, dtype=torch.long))
    if block_ids is None:
        new_group = torch.ones(batch, seq, dtype=torch.long, device=device)
    else:
        block_ids = block_ids.to(device=device, dtype=torch.long)
        prev = torch.nn.functional.pad(block_ids, (1, 0))[:, :-1]
        new_group = ~((block_ids > 0) & (block_ids == prev) & (docs == _shift_right(docs)))
        new_group = new_group.long()
    groups = new_group.cumsum(-1)
    if position_ids is None:
        position_ids = _positions_per_document(valid, docs)
    return Segments(position_ids.to(device=device, dtype=torch.long), groups, docs, valid)


def _shift_right(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((x[:, :1], x[:, :-1]), dim=1)


def _positions_per_document(valid: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    counts = valid.long().cumsum(-1)  # valid tokens so far, including this one
    index = torch.arange(valid.shape[1], device=valid.device).expand_as(docs)
    starts = docs != _shift_right(docs)
    starts[:, 0] = True
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values
    before_doc = (counts - valid.long()).gather(1, start_index)
    return (counts - before_doc - 1).clamp_min(0)


def attention_mask(q: Segments, k: Segments) -> torch.Tensor:
    """(B, 1, Sq, Sk) bool, True where query i may attend to key j.

    A query row that may see nothing (a pad in a batch) sees everything instead, so that no row
    of the softmax is empty (NaN); its output is never read.
    """
    allowed = (
        (k.groups[:, None, :] <= q.groups[:, :, None])
        & (k.docs[:, None, :] == q.docs[:, :, None])
        & k.valid[:, None, :]
    )
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed.unsqueeze(1)
