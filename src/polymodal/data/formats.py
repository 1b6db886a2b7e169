"""Documents -> token layouts: what every family's format is made of (`Encoded`, labels, prompts, `fit_text`)
and images anywhere in the text (`ImagesInTextFormat`, KOSMOS-1's and Flamingo's). A family's own format lives
in its folder (`families/<name>/format.py`) and is found through its spec (`families.collators`).

A format lays one `Document` out as its family's model reads it (token ids, labels, family extras
such as token_type_ids, and the media tensors in token order); `fit` takes a model config's vocabulary
size and special token ids from a tokenizer. Batching is `collate.py`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from polymodal.config import DecoderConfig
from polymodal.data.documents import Document
from polymodal.data.processors import CLIP_MEAN, CLIP_STD, ImageProcessor
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import DocumentError

IGNORE = -100
SEPARATOR = "\n"  # between text segments, and between a prompt and its answer (PaliGemma's "\n")


@dataclass
class Encoded:
    """One document as model inputs: equal-length per-token lists plus its media tensors."""

    tokens: dict[str, list[int]]  # input_ids, labels and family extras (token_type_ids, ...)
    media: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. pixel_values (n_images, 3, H, W)

    def __len__(self) -> int:
        return len(self.tokens["input_ids"])


def _name(doc: Document, index: int | None = None) -> str:
    return (f"document {doc.id!r}" if doc.id is not None else f"the document at {doc.origin}" if doc.origin
            else f"document {index}" if index is not None else "the document")


def caption(doc: Document) -> str:
    """The caption of an image-caption pair document: its target text, or all of its text when nothing is a target."""
    texts = [s.text for s, t in zip(doc.segments, doc.target_mask) if s.kind == "text" and t]
    return " ".join(texts or doc.texts)


def fit_text(config: DecoderConfig, tokenizer: Tokenizer) -> DecoderConfig:
    """A decoder config with its vocabulary size and bos / eos / pad ids taken from the tokenizer."""
    return config.replace(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                          bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)


def _prompt(doc: Document) -> list:
    """The segments before the first one marked as a target (all of them if none is): what a
    model is given to write the rest. Prompts end in a separator, as they do in training."""
    first = next((i for i, s in enumerate(doc.segments) if s.target), len(doc.segments))
    return doc.segments[:first]


def _labels(pieces: list[tuple[list[int], bool]]) -> list[int]:
    """(token ids, is target) pieces -> labels: the ids on targets, IGNORE elsewhere."""
    return [i if target else IGNORE for ids, target in pieces for i in ids]



class ImagesInTextFormat:
    """Images anywhere in the text (KOSMOS-1's layout, which Flamingo's follows): <bos>, then the segments in
    their order, each image as the ids `image_tokens()` gives, each text followed by a separator (the last
    segment by <eos>); labels on target text. Images get CLIP's preprocessing. A family subclasses it with its
    `fit` and `image_tokens`."""

    family = "this model"

    def __init__(self, config, tokenizer: Tokenizer):
        self.tokenizer, self.config = tokenizer, config
        self.sep = tokenizer.encode(SEPARATOR)
        self.max_len = config.text.max_seq_len
        size = config.vision.image_size
        self.images = ImageProcessor(size=(size, size), resample="bicubic", image_mean=CLIP_MEAN, image_std=CLIP_STD)

    def encode(self, doc: Document, prompt_only: bool = False) -> Encoded:
        segments = [(s, False) for s in _prompt(doc)] if prompt_only else list(zip(doc.segments, doc.target_mask))
        if unreadable := sorted({s.kind for s, _ in segments} - {"text", "image"}):
            raise DocumentError(f"{_name(doc)} has {', '.join(unreadable)} segments; {self.family} reads images and text")
        if any(s.kind == "image" and t for s, t in segments):
            raise DocumentError(f"{_name(doc)} has an image target; {self.family} writes text only")
        tok = self.tokenizer
        pieces = [([tok.bos_id], False)]
        for i, (seg, target) in enumerate(segments):
            if seg.kind == "image":
                pieces.append((self.image_tokens(), False))
            else:
                last = i == len(segments) - 1 and not prompt_only
                text = tok.encode(seg.text, split_special_tokens=True)  # never a control token
                pieces += [(text, target), ([tok.eos_id] if last else self.sep, target)]
        if not prompt_only and segments and segments[-1][0].kind == "image":
            pieces.append(([tok.eos_id], False))
        images = [s.media for s, _ in segments if s.kind == "image"]
        tokens = {"input_ids": [i for p, _ in pieces for i in p], "labels": _labels(pieces)}
        return Encoded(tokens, {"pixel_values": self.images(images)} if images else {})

    def image_tokens(self) -> list[int]:
        """The ids an image takes in the text."""
        raise NotImplementedError
