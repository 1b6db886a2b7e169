"""One mask system: every attention mask comes from per-token segment ids.

Each token carries four ids (a `Segments`):
  positions  its position (reset per packed document, pads not counted)
  groups     token i may see token j iff groups[j] <= groups[i]; strictly increasing groups give
             a causal mask, equal groups a bidirectional block (a prefix, an image)
  docs       packed document id: tokens only see their own document
  valid      False for padding: nobody sees a pad

`attention_mask(q, k)` is the only place these become a mask, for training, prefill and cached
decode alike (the cache keeps the `Segments` of its slots); `block_mask(q, k)` is the same rule as a
FlexAttention `BlockMask`. This is big_vision's
`cumsum(mask_ar)` construction (PaliGemma) extended with documents and padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from polymodal.errors import InputError, check_mask, check_tensors


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
    if position_ids is not None and tuple(position_ids.shape) == (1, seq):  # HF's one row for the whole batch
        position_ids = position_ids.expand(batch, seq)
    if attention_mask is not None:
        check_mask(attention_mask, (batch, seq))
    check_tensors(document_ids=document_ids, block_ids=block_ids, position_ids=position_ids)
    for name, t in (("attention_mask", attention_mask), ("document_ids", document_ids), ("block_ids", block_ids),
                    ("position_ids", position_ids)):
        if t is not None and tuple(t.shape) != (batch, seq):
            raise InputError(f"{name} must have the shape of the input (batch, seq) = {(batch, seq)}, "
                             f"got {tuple(t.shape)}")
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


def _sees(q_group, q_doc, k_group, k_doc, k_valid):
    """The rule: a key is visible from a query of its document, in an earlier or the same group, unless it is a pad."""
    return (k_group <= q_group) & (k_doc == q_doc) & k_valid


def visible(q: Segments, k: Segments) -> torch.Tensor:
    """(B, Sq, Sk) bool, True where query i may see key j; rows that see nothing are left empty."""
    return _sees(q.groups[:, :, None], q.docs[:, :, None], k.groups[:, None, :], k.docs[:, None, :], k.valid[:, None, :])


def mask_mod(q: Segments, k: Segments):
    """The rule as a FlexAttention mask_mod(b, h, q_idx, kv_idx) over these segments' indices."""
    def sees(b, h, q_idx, kv_idx):
        return _sees(q.groups[b, q_idx], q.docs[b, q_idx], k.groups[b, kv_idx], k.docs[b, kv_idx], k.valid[b, kv_idx])
    return sees


def block_mask(q: Segments, k: Segments) -> BlockMask:
    """The rule as a FlexAttention `BlockMask` (one for all heads); a query that sees nothing gets zeros."""
    (B, Sq), Sk = q.groups.shape, k.groups.shape[1]
    return create_block_mask(mask_mod(q, k), B, None, Sq, Sk, device=q.groups.device)


def attention_mask(q: Segments, k: Segments) -> torch.Tensor:
    """(B, 1, Sq, Sk) bool, True where query i may attend to key j.

    A query row that may see nothing (a pad in a batch) sees everything instead, so that no row
    of the softmax is empty (NaN); its output is never read.
    """
    allowed = visible(q, k)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed.unsqueeze(1)


def media_ids(media_locations: torch.Tensor, docs: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S) long: for each token, the 1-based number of the latest media starting at or before it
    (Flamingo's `media_locations.cumsum`), 0 if none has started yet.

    media_locations (B, S) bool marks the token where each media starts (its `<image>` token).
    docs (B, S) packed document ids: a token never sees media of an earlier document (0 instead).
    """
    ids = media_locations.long().cumsum(-1)
    if docs is not None:
        index = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        start = torch.where(media_locations.bool(), index, torch.zeros_like(index)).cummax(-1).values
        ids = ids.masked_fill(docs.gather(1, start) != docs, 0)
    return ids


def media_attention_mask(ids: torch.Tensor, n_media: int, tokens_per_media: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flamingo's media-local mask for cross-attention from text to n_media media of tokens_per_media
    tokens each, laid out one media after the other.

    ids (B, S) from `media_ids`: text token t attends only to the tokens of media ids[t].
    Returns the mask (B, 1, S, n_media * tokens_per_media) bool and sees_media (B, S) bool. A token
    before any media may see nothing: its row is all True so the softmax stays finite, and
    sees_media is False so the model zeroes its cross-attention output.
    """
    key_ids = torch.arange(n_media * tokens_per_media, device=ids.device) // tokens_per_media + 1
    allowed = key_ids == ids[:, :, None]  # (B, S, L)
    sees_media = allowed.any(-1)
    return (allowed | ~sees_media[:, :, None]).unsqueeze(1), sees_media


@dataclass(frozen=True)
class LocalWindow:
    """Sliding-window attention computed in chunks (USM's Conformer; Gemma 3n's audio tower): the query at time
    t sees the keys t-left .. t+right. Queries go in blocks of `chunk`, each against its context of
    chunk + left + right keys, so the cost grows as S * context, not S². With right = 0 it only looks back,
    which is what lets a stream be encoded chunk by chunk.

    Shapes: U blocks of W = chunk queries, C = context keys per block."""

    chunk: int
    left: int
    right: int = 0

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.left < 0 or self.right < 0:
            raise InputError(f"a LocalWindow needs chunk >= 1 and left, right >= 0, got {self}")

    @property
    def context(self) -> int:
        return self.chunk + self.left + self.right

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(..., S, d) -> (..., U, W, d), zero-padded at the end."""
        pad = -x.shape[-2] % self.chunk
        return F.pad(x, (0, 0, 0, pad)).unflatten(-2, (-1, self.chunk))

    def contexts(self, x: torch.Tensor) -> torch.Tensor:
        """(..., S, d) -> (..., U, C, d): block u's keys, times u*W - left .. (u+1)*W - 1 + right (zeros outside)."""
        x = F.pad(x, (0, 0, self.left, self.right + self.chunk - 1))
        return x.unfold(-2, self.context, self.chunk).transpose(-1, -2)

    def unblock(self, y: torch.Tensor, length: int) -> torch.Tensor:
        """(..., U, W, d) -> (..., length, d)."""
        return y.flatten(-3, -2)[..., :length, :]

    def distances(self, device: torch.device | None = None) -> torch.Tensor:
        """(W, C) long: query time minus key time for query w and context slot c of any block."""
        w, c = torch.arange(self.chunk, device=device), torch.arange(self.context, device=device)
        return w[:, None] + self.left - c[None, :]

    def mask(self, valid: torch.Tensor) -> torch.Tensor:
        """valid (B, S) bool, False for padding -> (B, 1, U, W, C) bool: the window, over keys that are not
        padding. A query that may see nothing (deep in the padding) sees its whole context instead, so that no
        softmax row is empty; its output is never read."""
        keys = self.contexts(valid[..., None].float())[..., 0] > 0  # (B, U, C)
        d = self.distances(valid.device)
        allowed = (d >= -self.right) & (d <= self.left) & keys[:, :, None, :]
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        return allowed.unsqueeze(1)
