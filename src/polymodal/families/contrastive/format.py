"""Documents -> image-caption pairs for the CLIP / SigLIP dual encoders (`model.py`).

A pair document holds exactly one image and its caption: the text segments marked as targets, or
all of its text when none is (so the built-in world's "caption" examples, an image, the prompt
"caption" and the target "a red circle", give the pair (image, "a red circle")). Texts are laid out
as each reference tokenizes them: CLIP `<bos> text <eos>` right-padded, pooled at `<eos>`; SigLIP
`text <eos>` padded to the text tower's max_seq_len, pooled at the last position (big_vision).
A batch is `input_ids` (N, S), `attention_mask` (N, S), `pixel_values` (N, 3, H, W): text i is
image i's caption, and there are no labels: the loss is contrastive over the batch.
"""

from __future__ import annotations

import torch

from polymodal.data.documents import Document
from polymodal.data.formats import Encoded, _name, caption
from polymodal.data.processors import CLIP_MEAN, CLIP_STD, ImageProcessor
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import ConfigError, DocumentError
from polymodal.families.contrastive.config import ContrastiveConfig


class PairFormat:
    def __init__(self, config: ContrastiveConfig, tokenizer: Tokenizer):
        self.tokenizer, self.config = tokenizer, config
        self.max_len = config.text.max_seq_len
        size, clip = config.vision.image_size, config.vision.variant == "clip"
        self.images = (ImageProcessor(size=(size, size), image_mean=CLIP_MEAN, image_std=CLIP_STD) if clip
                       else ImageProcessor(size=(size, size)))

    @staticmethod
    def fit(config, tokenizer: Tokenizer):
        return config.replace(text=config.text.replace(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                                                       bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id))

    def text(self, text: str) -> list[int]:
        tok = self.tokenizer
        ids = tok.encode(text, split_special_tokens=True) + [tok.eos_id]  # never a control token
        return [tok.bos_id] + ids if self.config.text.variant == "clip" else ids

    def encode(self, doc: Document, prompt_only: bool = False) -> Encoded:
        if prompt_only:
            raise DocumentError("a dual encoder embeds images and captions; it writes nothing, so it takes no prompts")
        kinds = [s.kind for s in doc.segments]
        if unreadable := sorted(set(kinds) - {"text", "image"}):
            raise DocumentError(f"{_name(doc)} has {', '.join(unreadable)} segments; a dual encoder reads an image "
                             "and its caption")
        if kinds.count("image") != 1 or "text" not in kinds:
            raise DocumentError(f"{_name(doc)} has {kinds.count('image')} images and {kinds.count('text')} texts; a "
                             "dual encoder reads exactly one image and its caption per document")
        image = next(s.media for s in doc.segments if s.kind == "image")
        return Encoded({"input_ids": self.text(caption(doc))}, {"pixel_values": self.images([image])})


class PairCollator:
    """Pair documents -> a contrastive batch; the interface of `collate.Collator` that training uses."""

    def __init__(self, format: PairFormat, max_len: int | None = None):
        self.format = format
        self.pad_id = format.tokenizer.pad_id
        self.max_len = max_len or format.max_len
        self.fixed = format.config.text.variant != "clip"  # SigLIP pools the last position: always the same length

    def encode(self, doc: Document, prompt_only: bool = False, index: int | None = None) -> Encoded:
        try:
            enc = self.format.encode(doc, prompt_only)
        except ValueError as e:
            raise DocumentError(str(e)) from e
        if len(enc) > self.max_len:
            raise DocumentError(f"{_name(doc, index)}'s caption is {len(enc)} tokens long; the limit is "
                                f"max_len={self.max_len}")
        return enc

    def __call__(self, docs: list[Document], pack: bool = False) -> dict[str, torch.Tensor]:
        if pack:
            raise ConfigError("a dual encoder trains on image-caption pairs, one per row: --pack does not apply")
        encoded = [self.encode(d, index=i) for i, d in enumerate(docs)]
        batch = self.texts([e.tokens["input_ids"] for e in encoded])
        batch["pixel_values"] = torch.cat([e.media["pixel_values"] for e in encoded])
        return batch

    def texts(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Token id lists -> right-padded input_ids and attention_mask."""
        width = self.max_len if self.fixed else max(map(len, ids))
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, :len(row)], attention_mask[i, :len(row)] = torch.tensor(row), 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}
