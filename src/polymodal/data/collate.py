"""Documents -> model inputs: padded batches, packed batches, and prompts for generation.

Each family lays a `Document` out as tokens its own way (its format, named in its spec); batching is
shared:

  padded  one document per row, right-padded; `attention_mask` 0 on pads
  packed  several documents per row, `document_ids` 1, 2, ... per document (0 on pads): the
          mask system (`masks.make_segments`) keeps them apart and restarts positions at each
          document, so a packed document trains exactly as it would alone

Labels follow the HF convention the models implement: aligned with input_ids (the model shifts
them), -100 where no loss goes. The first token of every document is never a label, so in a
packed row no document learns to predict the next one's start.
"""

from __future__ import annotations

import torch

from polymodal.data.documents import Document
from polymodal.data.formats import IGNORE, Encoded, _name
from polymodal.errors import DocumentError, PolymodalError


class Collator:
    """Turns documents into batches through a family's format (`families.collators.make_collator` picks both).

    max_len: the longest document allowed (default: the model's context), and the row length
    of packed batches."""

    PAD_VALUES = {"labels": IGNORE, "token_type_ids": 0}

    def __init__(self, format, max_len: int | None = None):
        self.format = format
        self.pad_id = format.tokenizer.pad_id
        self.max_len = max_len or format.max_len

    def encode(self, doc: Document, prompt_only: bool = False, index: int | None = None, limit: bool = True) -> Encoded:
        """One document laid out by the format; limit: refuse one longer than max_len (a prompt is checked
        against the context with its new tokens instead, by `generation.prompts`)."""
        try:
            enc = self.format.encode(doc, prompt_only)
        except ValueError as e:  # the formats' and processors' complaints about a document are document errors
            if isinstance(e, PolymodalError):
                raise
            raise DocumentError(str(e)) from e
        if limit and len(enc) > self.max_len:
            raise DocumentError(f"{_name(doc, index)} is {len(enc)} tokens long; the limit is max_len={self.max_len}")
        if not prompt_only and all(label == IGNORE for label in enc.tokens["labels"]):
            raise DocumentError(f"{_name(doc, index)} has no target tokens, so nothing to learn from")
        return enc

    def __call__(self, docs: list[Document], pack: bool = False) -> dict[str, torch.Tensor]:
        encoded = [self.encode(d, index=i) for i, d in enumerate(docs)]
        return self.pack(encoded, self.max_len) if pack else self.pad(encoded)

    def prompts(self, docs: list[Document]) -> dict[str, torch.Tensor]:
        """Each document up to its first target, ready for `generate` (no labels); `generation.prompts` adds
        the check against the context and the new tokens asked for."""
        return self.prompt_batch(self.prompt_encodings(docs))

    def prompt_encodings(self, docs: list[Document]) -> list[Encoded]:
        return [self.encode(d, prompt_only=True, index=i, limit=False) for i, d in enumerate(docs)]

    def prompt_batch(self, encoded: list[Encoded]) -> dict[str, torch.Tensor]:
        batch = self.pad(encoded)
        del batch["labels"]
        return batch

    def pad(self, encoded: list[Encoded]) -> dict[str, torch.Tensor]:
        """One document per row, right-padded to the longest."""
        return self._rows([[e] for e in encoded], max(map(len, encoded)), packed=False)

    def pack(self, encoded: list[Encoded], row_len: int) -> dict[str, torch.Tensor]:
        """Documents packed in order into rows of row_len tokens (first fit; a document never
        straddles two rows)."""
        rows: list[list[Encoded]] = []
        free: list[int] = []
        for i, e in enumerate(encoded):
            if len(e) > row_len:
                raise DocumentError(f"document {i} is {len(e)} tokens long, longer than a packed row ({row_len})")
            slot = next((r for r, f in enumerate(free) if f >= len(e)), None)
            if slot is None:
                rows.append([])
                free.append(row_len)
                slot = len(rows) - 1
            rows[slot].append(e)
            free[slot] -= len(e)
        return self._rows(rows, row_len, packed=True)

    def _rows(self, rows: list[list[Encoded]], width: int, packed: bool) -> dict[str, torch.Tensor]:
        keys = list(rows[0][0].tokens)
        batch = {k: torch.full((len(rows), width), self.PAD_VALUES.get(k, self.pad_id), dtype=torch.long) for k in keys}
        batch["attention_mask"] = torch.zeros(len(rows), width, dtype=torch.long)
        if packed:
            batch["document_ids"] = torch.zeros(len(rows), width, dtype=torch.long)
        media: dict[str, list[torch.Tensor]] = {}
        for r, docs in enumerate(rows):
            start = 0
            for d, e in enumerate(docs, 1):
                end = start + len(e)
                for k in keys:
                    batch[k][r, start:end] = torch.tensor(e.tokens[k])
                batch["attention_mask"][r, start:end] = 1
                if packed:
                    batch["document_ids"][r, start:end] = d
                for k, v in e.media.items():  # in token order: row by row, document by document
                    media.setdefault(k, []).append(v)
                start = end
        batch.update({k: torch.cat(v) for k, v in media.items()})
        return batch


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss (the models shift labels left by one inside); in a dual encoder's batch, which
    has no labels (`families/contrastive/format.py`), its image-caption pairs."""
    if "labels" not in batch:
        return len(batch["pixel_values"])
    return int((batch["labels"][:, 1:] != IGNORE).sum())
