"""Documents -> token layouts: the pieces every family's format is made of, and the early-fusion formats.

A format lays one `Document` out as its family's model reads it (token ids, labels, family extras
such as token_type_ids, and the media tensors in token order); `fit` takes a model config's vocabulary
size and special token ids from a tokenizer. Batching is `collate.py`'s. Formats read model configs
(`fusion/configs.py`), never model modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from polymodal.config import ConfigError, DecoderConfig
from polymodal.data.documents import Document
from polymodal.data.media import check_waveform, resample
from polymodal.data.processors import CLIP_MEAN, CLIP_STD, ImageProcessor, images_to_pixels
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.mel import AudioFeatureExtractor
from polymodal.errors import DocumentError
from polymodal.fusion.configs import ChameleonConfig, GeminiConfig, KosmosConfig, MediaTokens, PaliGemmaConfig

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
        texts = [(s.text, t) for s, t in segments if s.kind == "text"]
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

    def _join(self, texts: list[str]) -> list[int]:
        ids: list[int] = []
        for i, text in enumerate(texts):
            ids += (self.sep if i else []) + self.tokenizer.encode(text, split_special_tokens=True)
        return ids


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


class KosmosFormat(ImagesInTextFormat):
    """KOSMOS-1: each image as <image>, n_image_latents placeholders, </image> (`KosmosConfig.image_tokens`)."""

    family = "KOSMOS-1"

    @staticmethod
    def fit(config: KosmosConfig, tokenizer: Tokenizer) -> KosmosConfig:
        return config.replace(text=fit_text(config.text, tokenizer),
                              image_token_id=tokenizer.token_id("<image>"),
                              image_end_token_id=tokenizer.token_id("</image>"), placeholder_token_id=tokenizer.pad_id)

    def image_tokens(self) -> list[int]:
        return self.config.image_tokens()


class GeminiFormat:
    """Documents -> the Gemini stream: <bos>, then the segments in document order, each text segment
    ended by "\\n" (the last by <eos>) and each media a span `<img> P*n </img>` (`<audio>`, `<video>`);
    labels on target text and, for a model with image output (vq), on target images: `tokens.draw` spans
    whose placeholders the model fills with the image's VQ codes (`models/drawing.py`). Images (and video
    frames) are resized to image_size and scaled to [-1, 1]; audio at any sample rate is resampled to
    the encoder's and becomes Whisper log-mel; it must fit the encoder's window (a longer clip is an error, never
    cut silently)."""

    def __init__(self, config: GeminiConfig, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.sep = tokenizer.encode(SEPARATOR)
        self.max_len = config.text.max_seq_len
        self.images = ImageProcessor(size=(config.image_size, config.image_size), resample="bicubic")
        a = config.audio
        self.audio = (AudioFeatureExtractor(a.n_mels, a.sampling_rate, a.hop_length, a.n_fft,
                                            a.chunk_samples // a.sampling_rate) if a is not None else None)

    @staticmethod
    def fit(config: GeminiConfig, tokenizer) -> GeminiConfig:
        ids, V = tokenizer.special_ids, tokenizer.vocab_size
        tokens = MediaTokens(placeholder=ids["<image>"], image=(ids["<img>"], ids["</img>"]),
                             audio=(ids["<audio>"], ids["</audio>"]), video=(ids["<video>"], ids["</video>"]))
        text = fit_text(config.text, tokenizer)
        if config.vq is None:
            return config.replace(text=text, tokens=tokens)
        # written images: their begin and end tokens, then the VQ codes, right after the tokenizer's vocabulary
        return config.replace(text=text.replace(vocab_size=V + 2 + config.vq.num_embeddings),
                              tokens=tokens.replace(draw=(V, V + 1)), image_codes=V + 2)

    def encode(self, doc, prompt_only: bool = False):
        segments = list(zip(doc.segments, doc.target_mask))
        if prompt_only:
            segments = [(s, False) for s in _prompt(doc)]
        cfg, tok, pieces = self.config, self.tokenizer, [([self.tokenizer.bos_id], False)]
        media: dict[str, list[torch.Tensor]] = {}
        for i, (seg, target) in enumerate(segments):
            if seg.kind == "text":
                last = i == len(segments) - 1 and not prompt_only
                text = tok.encode(seg.text, split_special_tokens=True)  # never a control token
                pieces += [(text, target), ([tok.eos_id] if last else self.sep, target)]
                continue
            if target:
                pieces += self._drawn(seg, _name(doc), last=i == len(segments) - 1)
                media.setdefault("target_pixel_values", []).append(images_to_pixels([seg.media], cfg.vq.resolution))
                continue
            key, tensor, n = self._media(seg, _name(doc))
            start, end = getattr(self.config.tokens, seg.kind)
            pieces.append(([start] + [self.config.tokens.placeholder] * n + [end], False))
            media.setdefault(key, []).append(tensor)
        tokens = {"input_ids": [i for p, _ in pieces for i in p], "labels": _labels(pieces)}
        return Encoded(tokens, {k: torch.cat(v) for k, v in media.items()})

    def _drawn(self, seg, name: str, last: bool) -> list[tuple[list[int], bool]]:
        """A target image: `begin`, a placeholder per code (`Gemini.writer` puts the codes in), `end`."""
        cfg = self.config
        if seg.kind != "image" or cfg.vq is None:
            raise DocumentError(f"{name} has a {seg.kind} target; this model reads media and writes text"
                             + (" and images" if cfg.vq is not None else ""))
        begin, end = cfg.tokens.draw
        span = [begin] + [cfg.tokens.placeholder] * cfg.vq.tokens_per_image + [end]
        return [(span, True)] + ([([self.tokenizer.eos_id], True)] if last else [])

    def _media(self, seg, name: str) -> tuple[str, torch.Tensor, int]:
        cfg = self.config
        if seg.kind == "image":
            return "pixel_values", self.images([seg.media]), cfg.tokens_per_image
        if seg.kind == "audio":
            if self.audio is None:
                raise DocumentError(f"{name} has an audio segment but this model has no audio encoder")
            return "input_features", self._audio(seg.media, name)[None], cfg.tokens_per_clip
        frames = list(seg.media or [])
        if not frames:
            raise DocumentError(f"{name} has a video with no frames; a video needs at least one frame")
        if len(frames) > cfg.max_frames:
            raise DocumentError(f"{name} has a video of {len(frames)} frames; this model embeds at most "
                             f"max_frames={cfg.max_frames}")
        return "pixel_values_videos", self.images(frames)[None], len(frames) * cfg.tokens_per_image


    def _audio(self, clip, name: str) -> torch.Tensor:
        """A clip at any sample rate -> log-mel at the encoder's rate. Its length is counted in seconds before
        resampling, so a clip past the window is refused for that, whatever its rate, never cut silently."""
        check_waveform(clip.waveform, clip.sample_rate)
        rate, seconds = self.audio.sampling_rate, len(clip.waveform) / clip.sample_rate
        if math.ceil(len(clip.waveform) * rate / clip.sample_rate) > self.audio.n_samples:
            raise DocumentError(f"{name} has an audio clip of {seconds:g} s (at {clip.sample_rate} Hz); the audio "
                                f"encoder hears at most {self.audio.chunk_length} s: cut it into clips")
        return self.audio(resample(clip.waveform, clip.sample_rate, rate), sampling_rate=rate)


class ChameleonFormat:
    """Documents -> Chameleon's stream: <bos>, then the segments in order, each text ended by "\\n" (the
    last by <eos>), each image `<img> <image>*n </img>` with its pixels (a last image is followed by
    <eos>). Target text and target images carry labels: the model learns to write both; a target
    image's placeholder labels become its code tokens inside the model (`Chameleon.splice_images`)."""

    def __init__(self, config: ChameleonConfig, tokenizer):
        if None in (config.image_token_id, config.begin_image_id, config.end_image_id):
            raise ConfigError("documents with images need image_token_id, begin_image_id and end_image_id")
        self.config, self.tokenizer = config, tokenizer
        self.sep = tokenizer.encode(SEPARATOR)
        self.max_len = config.text.max_seq_len

    @staticmethod
    def fit(config: ChameleonConfig, tokenizer) -> ChameleonConfig:
        """Text tokens from the tokenizer, then the VQ codes right after them."""
        V, ids = tokenizer.vocab_size, tokenizer.special_ids
        text = fit_text(config.text, tokenizer).replace(vocab_size=V + config.vq.num_embeddings)
        return config.replace(text=text, image_tokens=V, image_token_id=ids["<image>"],
                              begin_image_id=ids["<img>"], end_image_id=ids["</img>"])

    def encode(self, doc, prompt_only: bool = False):
        cfg, tok = self.config, self.tokenizer
        segments = [(s, False) for s in _prompt(doc)] if prompt_only else list(zip(doc.segments, doc.target_mask))
        if unreadable := sorted({s.kind for s, _ in segments} - {"text", "image"}):
            raise DocumentError(f"{_name(doc)} has {', '.join(unreadable)} segments; Chameleon reads images and text")
        pieces, images = [([tok.bos_id], False)], []
        for i, (seg, target) in enumerate(segments):
            last = i == len(segments) - 1 and not prompt_only
            if seg.kind == "text":
                text = tok.encode(seg.text, split_special_tokens=True)  # never a control token
                pieces += [(text, target), ([tok.eos_id] if last else self.sep, target)]
                continue
            span = [cfg.begin_image_id] + [cfg.image_token_id] * cfg.vq.tokens_per_image + [cfg.end_image_id]
            pieces += [(span, target)] + ([([tok.eos_id], target)] if last else [])
            images.append(seg.media)
        tokens = {"input_ids": [i for p, _ in pieces for i in p], "labels": _labels(pieces)}
        return Encoded(tokens, {"pixel_values": images_to_pixels(images, cfg.vq.resolution)} if images else {})

