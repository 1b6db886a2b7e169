"""Documents -> Flamingo inputs (`models/flamingo.py`): text with one `<image>` token where each image
starts, and the images apart, per row.

A document is laid out as Flamingo's interleaved web pages are (Alayrac et al. 2022, §2.4): `<bos>`,
then its segments in order, each image as a single `<image>` token (the media token the model finds
them by), each text followed by a separator (the last segment by `<eos>`); labels on target text.
The text after an image cross-attends to it alone, until the next image. Unlike the early-fusion
formats, the images are not in the token stream: a batch carries `pixel_values` (B, N, 3, H, W),
each row's images first (in order of appearance, documents of a packed row one after another), and
`media_mask` (B, N) that marks them, N the most images of any row. CLIP's preprocessing.
"""

from __future__ import annotations

import torch

from polymodal.data.collate import (
    SEPARATOR, Collator, DecoderFormat, Encoded, _labels, _name, _prompt)
from polymodal.data.documents import Document
from polymodal.data.processors import CLIP_MEAN, CLIP_STD, ImageProcessor
from polymodal.data.tokenizer import Tokenizer


class InterleavedFormat:
    def __init__(self, config, tokenizer: Tokenizer):
        self.tokenizer, self.config = tokenizer, config
        self.sep = tokenizer.encode(SEPARATOR)
        self.max_len = config.text.max_seq_len
        size = config.vision.image_size
        self.images = ImageProcessor(size=(size, size), image_mean=CLIP_MEAN, image_std=CLIP_STD)

    @staticmethod
    def fit(config, tokenizer: Tokenizer):
        return config.replace(text=DecoderFormat.fit(config.text, tokenizer), media_token_id=tokenizer.token_id("<image>"))

    def encode(self, doc: Document, prompt_only: bool = False) -> Encoded:
        segments = [(s, False) for s in _prompt(doc)] if prompt_only else list(zip(doc.segments, doc.target_mask))
        if unreadable := sorted({s.kind for s, _ in segments} - {"text", "image"}):
            raise ValueError(f"{_name(doc)} has {', '.join(unreadable)} segments; this Flamingo reads images and text")
        if any(s.kind == "image" and t for s, t in segments):
            raise ValueError(f"{_name(doc)} has an image target; Flamingo writes text only")
        tok = self.tokenizer
        pieces = [([tok.bos_id], False)]
        for i, (seg, target) in enumerate(segments):
            last = i == len(segments) - 1 and not prompt_only
            if seg.kind == "image":
                pieces.append(([self.config.media_token_id], False))
            else:
                text = tok.encode(seg.text, split_special_tokens=True)  # never a control token
                pieces += [(text, target), ([tok.eos_id] if last else self.sep, target)]
        if not prompt_only and segments and segments[-1][0].kind == "image":
            pieces.append(([tok.eos_id], False))
        images = [s.media for s, _ in segments if s.kind == "image"]
        tokens = {"input_ids": [i for p, _ in pieces for i in p], "labels": _labels(pieces)}
        return Encoded(tokens, {"pixel_values": self.images(images)} if images else {})


class InterleavedCollator(Collator):
    """`Collator`'s padding and packing of the tokens; the images batched per row, as Flamingo takes them."""

    def __init__(self, config, tokenizer: Tokenizer, max_len: int | None = None):
        self.format = InterleavedFormat(config, tokenizer)
        self.pad_id = tokenizer.pad_id
        self.max_len = max_len or self.format.max_len

    def _rows(self, rows: list[list[Encoded]], width: int, packed: bool) -> dict[str, torch.Tensor]:
        batch = super()._rows([[Encoded(e.tokens) for e in docs] for docs in rows], width, packed)
        images = [[e.media["pixel_values"] for e in docs if e.media] for docs in rows]
        counts = [sum(len(x) for x in row) for row in images]
        if max(counts) == 0:
            return batch
        v = self.format.config.vision
        batch["pixel_values"] = torch.zeros(len(rows), max(counts), v.channels, v.image_size, v.image_size)
        batch["media_mask"] = torch.zeros(len(rows), max(counts), dtype=torch.bool)
        for r, row in enumerate(images):
            if row:
                batch["pixel_values"][r, :counts[r]] = torch.cat(row)
                batch["media_mask"][r, :counts[r]] = True
        return batch

