"""PaliGemma's document format: documents -> images first, then a prefix read both ways and a causal suffix."""

from __future__ import annotations

from polymodal.data.documents import Document, Segment
import numpy as np
import torch

from polymodal.data.locations import (
    LOC_TOKENS, SEG_TOKENS, add_location_tokens, encode_mask, format_locations, format_object)
from polymodal.data.formats import SEPARATOR, Encoded, _labels, _name, _prompt, fit_text
from polymodal.data.processors import ImageProcessor
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.mask_vae import MaskVAE
from polymodal.errors import DocumentError, InputError, UnknownNameError


class PaliGemmaFormat:
    """PaliGemma, laid out as HF's PaliGemmaProcessor does: one <image> placeholder per image
    token, all images first, then <bos> prefix "\n" suffix <eos>; token_type_ids 0 on the
    image and prefix (one bidirectional block), 1 on the suffix; labels on the suffix only."""

    def __init__(self, config, tokenizer: Tokenizer):
        self.tokenizer, self.config = tokenizer, config
        self.sep = tokenizer.encode(SEPARATOR)
        self.max_len = config.text.max_seq_len
        size = config.vision.image_size  # SigLIP's preprocessing: resize, scale to [-1, 1]
        self.images = ImageProcessor(size=(size, size), resample="bicubic")
        self.locations = _has_location_tokens(tokenizer)
        if self.locations:
            add_location_tokens(tokenizer)  # present already: registered to be read whole, nothing appended
        # codes the masks of a document's objects; a trainer loads the model's fitted weights into it
        self.mask_vae = MaskVAE(config.mask_vae).eval() if config.mask_vae is not None else None

    @staticmethod
    def fit(config, tokenizer: Tokenizer):
        return config.replace(text=fit_text(config.text, tokenizer),
                              image_token_id=tokenizer.token_id("<image>"))

    def encode(self, doc: Document, prompt_only: bool = False) -> Encoded:
        segments = list(zip(doc.segments, doc.target_mask))
        if prompt_only:
            segments = [(s, False) for s in _prompt(doc)]
        kinds = [s.kind for s, _ in segments]
        if unreadable := sorted(set(kinds) - {"text", "image"}):
            raise DocumentError(f"{_name(doc)} has {', '.join(unreadable)} segments; PaliGemma reads images and text")
        if any(s.kind == "image" and t for s, t in segments):
            raise DocumentError(f"{_name(doc)} has an image target; PaliGemma writes text only")
        if kinds != sorted(kinds, key=lambda k: k != "image"):
            raise DocumentError(f"{_name(doc)} has an image after text; PaliGemma takes its images before any text")
        texts = [(self._text(doc, s), t) for s, t in segments if s.kind == "text"]
        if [t for _, t in texts] != sorted(t for _, t in texts):
            raise DocumentError(f"{_name(doc)} has prompt text after target text (a user turn after an answer); "
                                "PaliGemma's prefix-LM layout holds one prompt, read both ways, then one answer: give "
                                "each turn its own document, or train a family that reads conversations (Gemini, "
                                "KOSMOS-1, Chameleon, Flamingo, a decoder LM)")
        tok = self.tokenizer
        images = [s.media for s, _ in segments if s.kind == "image"]
        prefix = [tok.bos_id] + self._join([text for text, t in texts if not t]) + self.sep
        suffix = [] if prompt_only else self._join([text for text, t in texts if t]) + [tok.eos_id]
        n_image = len(images) * self.config.tokens_per_image
        pieces = [([self.config.image_token_id] * n_image + prefix, False), (suffix, True)]
        tokens = {"input_ids": [i for p, _ in pieces for i in p], "labels": _labels(pieces),
                  "token_type_ids": [0] * (n_image + len(prefix)) + [1] * len(suffix)}
        return Encoded(tokens, {"pixel_values": self.images(images)} if images else {})

    def _text(self, doc: Document, segment: Segment) -> str:
        if segment.boxes is None:
            return segment.text
        if not self.locations:
            raise DocumentError(f"{_name(doc)} has boxes, but the tokenizer has no location tokens (<loc0000>..): "
                                "fine-tune a converted HF PaliGemma, whose tokenizer has them, or train with a "
                                "tokenizer given them by polymodal.data.locations.add_location_tokens")
        if len(doc.images) != 1:
            raise DocumentError(f"{_name(doc)} has boxes and {len(doc.images)} images; boxes are in the pixels of "
                                "one image: give exactly one")
        if segment.masks is not None and self.mask_vae is None:
            raise DocumentError(f"{_name(doc)} has masks, but the model has no mask VQ-VAE to code them as "
                                "segmentation tokens (its config's mask_vae is None): give one, as big_vision's "
                                "vae-oid.npz (polymodal train --mask-vae)")
        width, height = doc.images[0].size
        masks = segment.masks or [None] * len(segment.boxes)
        try:
            return format_locations([format_object(box, (height, width), label, self._codes(mask, box))
                                     for (label, box), mask in zip(segment.boxes, masks)])
        except InputError as e:
            raise DocumentError(f"{_name(doc)}: {e}") from e

    def _codes(self, mask, box) -> list[int] | None:
        if mask is None:
            return None
        return encode_mask(torch.from_numpy(np.asarray(mask) > 127), box, self.mask_vae)

    def _join(self, texts: list[str]) -> list[int]:
        ids: list[int] = []
        for i, text in enumerate(texts):
            ids += (self.sep if i else []) + self.tokenizer.encode(text, split_special_tokens=True)
        return ids


def _has_location_tokens(tokenizer: Tokenizer) -> bool:
    try:
        for token in LOC_TOKENS + SEG_TOKENS:
            tokenizer.token_id(token)
    except UnknownNameError:
        return False
    return True
