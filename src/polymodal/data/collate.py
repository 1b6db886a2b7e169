"""Documents -> model inputs: padded batches, packed batches, and prompts for generation.

Each family lays a `Document` out as tokens its own way (its "format", chosen by the type of the
model config in `FORMATS`); batching is shared:

  padded  one document per row, right-padded; `attention_mask` 0 on pads
  packed  several documents per row, `document_ids` 1, 2, ... per document (0 on pads): the
          mask system (`masks.make_segments`) keeps them apart and restarts positions at each
          document, so a packed document trains exactly as it would alone

Labels follow the HF convention the models implement: aligned with input_ids (the model shifts
them), -100 where no loss goes. The first token of every document is never a label, so in a
packed row no document learns to predict the next one's start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from polymodal.config import DecoderConfig
from polymodal.data.documents import Document
from polymodal.errors import DocumentError, PolymodalError
from polymodal.data.processors import ImageProcessor
from polymodal.data.processors import CLIP_MEAN, CLIP_STD
from polymodal.data.tokenizer import Tokenizer
from polymodal.models.chameleon import ChameleonConfig, ChameleonFormat
from polymodal.models.gemini import GeminiConfig, GeminiFormat
from polymodal.models.kosmos import KosmosConfig
from polymodal.models.paligemma import PaliGemmaConfig

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
    return (f"document {doc.id!r}" if doc.id is not None else f"document {index}" if index is not None
            else "the document")


class DecoderFormat:
    """Text-only decoder LMs: <bos> text <sep> text ... <eos>; labels on target text.

    A separator or the final <eos> is a label when the segment before it is a target, so the
    model learns where an answer ends."""

    def __init__(self, config: DecoderConfig, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.sep = tokenizer.encode(SEPARATOR)
        self.max_len = config.max_seq_len

    @staticmethod
    def fit(config: DecoderConfig, tokenizer: Tokenizer) -> DecoderConfig:
        return config.replace(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                              bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)

    def encode(self, doc: Document, prompt_only: bool = False) -> Encoded:
        kinds = sorted({s.kind for s in doc.segments} - {"text"})
        if kinds:
            raise ValueError(f"{_name(doc)} has {', '.join(kinds)} segments; a text-only decoder reads text only")
        tok = self.tokenizer
        segments = list(zip(doc.segments, doc.target_mask))
        if prompt_only:
            segments = [(s, False) for s in _prompt(doc)]
        pieces = [([tok.bos_id], False)]
        for i, (seg, target) in enumerate(segments):
            last = i == len(segments) - 1 and not prompt_only
            text = tok.encode(seg.text, split_special_tokens=True)  # never a control token
            pieces += [(text, target), ([tok.eos_id] if last else self.sep, target)]
        return Encoded({"input_ids": [i for p, _ in pieces for i in p], "labels": _labels(pieces)})


def _prompt(doc: Document) -> list:
    """The segments before the first one marked as a target (all of them if none is): what a
    model is given to write the rest. Prompts end in a separator, as they do in training."""
    first = next((i for i, s in enumerate(doc.segments) if s.target), len(doc.segments))
    return doc.segments[:first]


def _labels(pieces: list[tuple[list[int], bool]]) -> list[int]:
    """(token ids, is target) pieces -> labels: the ids on targets, IGNORE elsewhere."""
    return [i if target else IGNORE for ids, target in pieces for i in ids]


class PaliGemmaFormat:
    """PaliGemma, laid out as HF's PaliGemmaProcessor does: one <image> placeholder per image
    token, all images first, then <bos> prefix "\n" suffix <eos>; token_type_ids 0 on the
    image and prefix (one bidirectional block), 1 on the suffix; labels on the suffix only."""

    def __init__(self, config: PaliGemmaConfig, tokenizer: Tokenizer):
        self.tokenizer, self.config = tokenizer, config
        self.sep = tokenizer.encode(SEPARATOR)
        self.max_len = config.text.max_seq_len
        size = config.vision.image_size  # SigLIP's preprocessing: resize, scale to [-1, 1]
        self.images = ImageProcessor(size=(size, size), resample="bicubic")

    @staticmethod
    def fit(config: PaliGemmaConfig, tokenizer: Tokenizer) -> PaliGemmaConfig:
        return config.replace(text=DecoderFormat.fit(config.text, tokenizer),
                              image_token_id=tokenizer.token_id("<image>"))

    def encode(self, doc: Document, prompt_only: bool = False) -> Encoded:
        segments = list(zip(doc.segments, doc.target_mask))
        if prompt_only:
            segments = [(s, False) for s in _prompt(doc)]
        kinds = [s.kind for s, _ in segments]
        if unreadable := sorted(set(kinds) - {"text", "image"}):
            raise ValueError(f"{_name(doc)} has {', '.join(unreadable)} segments; PaliGemma reads images and text")
        if any(s.kind == "image" and t for s, t in segments):
            raise ValueError(f"{_name(doc)} has an image target; PaliGemma writes text only")
        if kinds != sorted(kinds, key=lambda k: k != "image"):
            raise ValueError(f"{_name(doc)} has an image after text; PaliGemma takes its images before any text")
        texts = [(s.text, t) for s, t in segments if s.kind == "text"]
        if [t for _, t in texts] != sorted(t for _, t in texts):
            raise ValueError(f"{_name(doc)} has prompt text after target text; PaliGemma's layout is "
                             "images, prompt, then target")
        tok = self.tokenizer
        images = [s.media for s, _ in segments if s.kind == "image"]
        prefix = [tok.bos_id] + self._join([text for text, t in texts if not t]) + self.sep
        suffix = [] if prompt_only else self._join([text for text, t in texts if t]) + [tok.eos_id]
        n_image = len(images) * self.config.tokens_per_image
        pieces = [([self.config.image_token_id] * n_image + prefix, False), (suffix, True)]
        tokens = {"input_ids": [i for p, _ in pieces for i in p], "labels": _labels(pieces),
                  "token_type_ids": [0] * (n_image + len(prefix)) + [1] * len(suffix)}
        return Encoded(tokens, {"pixel_values": self.images(images)} if images else {})

    def _join(self, texts: list[str]) -> list[int]:
        ids: list[int] = []
        for i, text in enumerate(texts):
            ids += (self.sep if i else []) + self.tokenizer.encode(text, split_special_tokens=True)
        return ids


class KosmosFormat:
    """KOSMOS-1: <bos>, then the segments in their order: each image as <image>, n_image_latents
    placeholders, </image> (`KosmosConfig.image_tokens`), each text followed by a separator (the
    last segment by <eos>); labels on target text. Images get CLIP's preprocessing."""

    family = "KOSMOS-1"

    def __init__(self, config: KosmosConfig, tokenizer: Tokenizer):
        self.tokenizer, self.config = tokenizer, config
        self.sep = tokenizer.encode(SEPARATOR)
        self.max_len = config.text.max_seq_len
        size = config.vision.image_size
        self.images = ImageProcessor(size=(size, size), resample="bicubic", image_mean=CLIP_MEAN, image_std=CLIP_STD)

    @staticmethod
    def fit(config: KosmosConfig, tokenizer: Tokenizer) -> KosmosConfig:
        return config.replace(text=DecoderFormat.fit(config.text, tokenizer),
                              image_token_id=tokenizer.token_id("<image>"),
                              image_end_token_id=tokenizer.token_id("</image>"), placeholder_token_id=tokenizer.pad_id)

    def encode(self, doc: Document, prompt_only: bool = False) -> Encoded:
        segments = [(s, False) for s in _prompt(doc)] if prompt_only else list(zip(doc.segments, doc.target_mask))
        if unreadable := sorted({s.kind for s, _ in segments} - {"text", "image"}):
            raise ValueError(f"{_name(doc)} has {', '.join(unreadable)} segments; {self.family} reads images and text")
        if any(s.kind == "image" and t for s, t in segments):
            raise ValueError(f"{_name(doc)} has an image target; {self.family} writes text only")
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
        return self.config.image_tokens()


FORMATS: dict[type, type] = {
    DecoderConfig: DecoderFormat,
    PaliGemmaConfig: PaliGemmaFormat,
    KosmosConfig: KosmosFormat,
    GeminiConfig: GeminiFormat,
    ChameleonConfig: ChameleonFormat,
}


def _format_class(config) -> type:
    if type(config) not in FORMATS:
        raise ValueError(f"no document format for {type(config).__name__}; known: "
                        f"{sorted(c.__name__ for c in FORMATS)}")
    return FORMATS[type(config)]


def fit_config(config, tokenizer: Tokenizer):
    """The model config with its vocabulary size and special token ids taken from the tokenizer."""
    return _format_class(config).fit(config, tokenizer)


class Collator:
    """Turns documents into batches for the model built from `config`.

    max_len: the longest document allowed (default: the model's context), and the row length
    of packed batches."""

    PAD_VALUES = {"labels": IGNORE, "token_type_ids": 0}

    def __init__(self, config, tokenizer: Tokenizer, max_len: int | None = None):
        self.format = _format_class(config)(config, tokenizer)
        self.pad_id = tokenizer.pad_id
        self.max_len = max_len or self.format.max_len

    def encode(self, doc: Document, prompt_only: bool = False, index: int | None = None) -> Encoded:
        try:
            enc = self.format.encode(doc, prompt_only)
        except ValueError as e:  # the formats' and processors' complaints about a document are document errors
            if isinstance(e, PolymodalError):
                raise
            raise DocumentError(str(e)) from e
        if len(enc) > self.max_len:
            raise DocumentError(f"{_name(doc, index)} is {len(enc)} tokens long; the limit is max_len={self.max_len}")
        if not prompt_only and all(label == IGNORE for label in enc.tokens["labels"]):
            raise DocumentError(f"{_name(doc, index)} has no target tokens, so nothing to learn from")
        return enc

    def __call__(self, docs: list[Document], pack: bool = False) -> dict[str, torch.Tensor]:
        encoded = [self.encode(d, index=i) for i, d in enumerate(docs)]
        return self.pack(encoded, self.max_len) if pack else self.pad(encoded)

    def prompts(self, docs: list[Document]) -> dict[str, torch.Tensor]:
        """Each document up to its first target, ready for `generate` (no labels)."""
        batch = self.pad([self.encode(d, prompt_only=True, index=i) for i, d in enumerate(docs)])
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
    has no labels (`data/pairs.py`), its image-caption pairs."""
    if "labels" not in batch:
        return len(batch["pixel_values"])
    return int((batch["labels"][:, 1:] != IGNORE).sum())
