"""Gemini-style early fusion (Gemini Team 2023): one decoder reads a single interleaved stream of text
tokens, image patches, audio features and video frames.

Each media span in `input_ids` is a run of placeholder tokens, wrapped in its modality's tokens
(`<img> ... </img>`, `<audio> ... </audio>`, `<video> ... </video>`); the placeholders are replaced
by the media embeddings before the first block (no cross-attention). Images enter either as
patches through one linear layer, as in Fuyu (Bavishi et al. 2023; HF `FuyuForCausalLM`, which
this model matches weight for weight through `convert/hf_gemini.py`), or through the ViT. Audio
(16 kHz log-mel) goes through the Whisper-style `AudioEncoder`; video is its frames, each embedded
as an image plus a learned temporal embedding. Media are encoded once, at prefill; decode steps
take text only.

A config with `vq` also writes images, as discrete VQ codes that are ordinary vocabulary entries
(Chameleon-style, `models/drawing.py`): `<draw>` codes `</draw>`, its own span tokens, apart from
the input `<img>` spans.

A config without modality tokens (Fuyu) treats every placeholder as an image token, in order.

Shapes: B batch, S tokens, N media, F frames, P tokens per media, D decoder width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import Config, ConfigError, DecoderConfig, _check_positive
from polymodal.encoders.audio import AudioConfig, AudioEncoder
from polymodal.encoders.vit import ViT, VisionConfig
from polymodal.encoders.vq import VQConfig, images_to_pixels
from polymodal.models.drawing import ImageWriter, check_image_output
from polymodal.models.parts import set_trainable
from polymodal.nn.cache import Cache
from polymodal.nn.masks import make_segments
from polymodal.nn.norms import make_norm
from polymodal.nn.transformer import Decoder, ModelOutput

MODALITIES = ("image", "audio", "video")


@dataclass
class MediaTokens(Config):
    """Token ids of the stream's media layout. A span is `start placeholder*P end`."""

    placeholder: int = 4  # replaced by one media embedding each (the built-in tokenizer's <image>)
    image: tuple[int, int] | None = (6, 7)  # (<img>, </img>); None: images need no wrapping (Fuyu)
    audio: tuple[int, int] | None = (8, 9)  # (<audio>, </audio>)
    video: tuple[int, int] | None = (10, 11)  # (<video>, </video>)
    draw: tuple[int, int] | None = None  # (begin, end) of an image the model writes; None: it writes text only

    def __post_init__(self) -> None:
        for kind in (*MODALITIES, "draw"):
            span = getattr(self, kind)
            if span is not None:
                span = tuple(span)  # JSON gives lists
                if len(span) != 2:
                    raise ConfigError(f"tokens.{kind} must be a (start, end) pair of ids, got {span}")
                setattr(self, kind, span)
        ids = self.ids()
        if len(set(ids)) != len(ids):
            raise ConfigError(f"media token ids must be distinct, got placeholder and spans {ids}")
        if self.image is None and (self.audio is not None or self.video is not None):
            raise ConfigError("unwrapped images (tokens.image=None) leave placeholders ambiguous once audio or "
                              "video spans exist; wrap images too")

    @property
    def wrapped(self) -> bool:
        return self.image is not None

    def ids(self) -> list[int]:
        return [self.placeholder, *(i for k in (*MODALITIES, "draw") for i in (getattr(self, k) or ()))]


@dataclass
class GeminiConfig(Config):
    text: DecoderConfig = field(default_factory=DecoderConfig)  # post-fusion norm: text.embed_norm
    tokens: MediaTokens = field(default_factory=MediaTokens)
    vision: VisionConfig | None = None  # image encoder; None: linear patch embedding (Fuyu)
    image_size: int = 32  # square images of this side (the ViT's when vision is set)
    patch_size: int = 8
    channels: int = 3
    patch_positions: bool = False  # a learned embedding per patch index, for linear patches (Fuyu has none)
    audio: AudioConfig | None = None  # None: no audio input
    audio_pool: int = 1  # average-pool the audio encoder's 50 Hz frames by this factor
    max_frames: int = 0  # learned temporal embeddings for video frames; 0: no video input
    modal_norm: bool = False  # a text.norm after each modality's projection into the decoder
    vq: VQConfig | None = None  # image output: the VQ tokenizer of the images it writes; None: text output only
    image_codes: int = 0  # token id of VQ code 0 (the codes are contiguous from it), with vq

    def __post_init__(self) -> None:
        _check_positive(self, "image_size", "patch_size", "channels", "audio_pool")
        if self.max_frames < 0:
            raise ConfigError(f"max_frames must be >= 0, got {self.max_frames}")
        if self.vision is not None and (self.vision.image_size, self.vision.patch_size, self.vision.channels) != (
                self.image_size, self.patch_size, self.channels):
            raise ConfigError(f"image_size/patch_size/channels ({self.image_size}, {self.patch_size}, {self.channels}) "
                              f"must equal the ViT's ({self.vision.image_size}, {self.vision.patch_size}, "
                              f"{self.vision.channels})")
        if self.patch_positions and self.vision is not None:
            raise ConfigError("patch_positions are for linear patches; the ViT (vision) has its own positions")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.audio is not None and self.audio.n_positions % self.audio_pool:
            raise ConfigError(f"audio.n_positions ({self.audio.n_positions}) must be divisible by audio_pool "
                              f"({self.audio_pool})")
        bad = [i for i in self.tokens.ids() if not 0 <= i < self.text.vocab_size]
        if bad:
            raise ConfigError(f"media token ids {bad} are outside the vocabulary [0, {self.text.vocab_size})")
        if self.vq is not None or self.tokens.draw is not None:
            check_image_output(self.vq, self.image_codes, self.tokens.draw, self.tokens.ids(), self.text.vocab_size)

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_clip(self) -> int:
        return self.audio.n_positions // self.audio_pool if self.audio is not None else 0


@dataclass
class Span:
    kind: str
    row: int
    start: int  # first placeholder
    length: int


class Gemini(nn.Module):
    def __init__(self, config: GeminiConfig, *, backend: str = "sdpa"):
        super().__init__()
        cfg = self.config = config
        dim = cfg.text.dim
        self.vision = ViT(cfg.vision) if cfg.vision is not None else None
        patch_in = cfg.vision.dim if cfg.vision is not None else cfg.patch_size ** 2 * cfg.channels
        self.image_proj = nn.Linear(patch_in, dim)  # Fuyu's vision_embed_tokens when there is no ViT
        self.patch_pos = nn.Embedding(cfg.tokens_per_image, dim) if cfg.patch_positions else None
        self.audio = AudioEncoder(cfg.audio) if cfg.audio is not None else None
        self.audio_proj = nn.Linear(cfg.audio.dim, dim) if cfg.audio is not None else None
        self.frame_embed = nn.Embedding(cfg.max_frames, dim) if cfg.max_frames else None
        self.image_norm, self.audio_norm = self._modal_norm(), self._modal_norm()
        for module in (self.image_proj, self.patch_pos, self.audio_proj, self.frame_embed):
            if module is not None:
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        self.decoder = Decoder(cfg.text, backend=backend)
        self.writer = (ImageWriter(cfg.vq, cfg.image_codes, *cfg.tokens.draw, cfg.tokens.placeholder)
                       if cfg.vq is not None else None)

    @property
    def image_spans(self):
        """The engine's image-span state machine (`models/drawing.py`); None for a model that writes text only."""
        return self.writer.spans if self.writer is not None else None

    def images_from_codes(self, codes: list[list[torch.Tensor]]):
        return self.writer.images_from_codes(codes)

    def _modal_norm(self) -> nn.Module:
        t = self.config.text
        return make_norm(t.norm, t.dim, t.norm_eps) if self.config.modal_norm else nn.Identity()

    def make_cache(self, batch: int, max_len: int, **kwargs) -> Cache:
        return self.decoder.make_cache(batch, max_len, **kwargs)

    def trainable(self, parts: tuple[str, ...] | list[str]) -> None:
        """Train exactly these parts (any of "vision", "audio", "projectors", "decoder"); freeze the rest."""
        set_trainable({"vision": [self.vision], "audio": [self.audio],
                       "projectors": [self.image_proj, self.patch_pos, self.audio_proj, self.frame_embed,
                                      self.image_norm, self.audio_norm],
                       "decoder": [self.decoder]}, parts)

    # -- media encoders: each returns (N, P, D) embeddings for the decoder -------------------------

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, H/p * W/p, p*p*C) row-major patches, each flattened (row, column, channel)
        as HF's FuyuImageProcessor does."""
        p = self.config.patch_size
        N, C, H, W = pixel_values.shape
        patches = pixel_values.unfold(2, p, p).unfold(3, p, p)  # (N, C, H/p, W/p, p, p)
        return patches.permute(0, 2, 3, 4, 5, 1).reshape(N, (H // p) * (W // p), p * p * C)

    def check_images(self, pixel_values: torch.Tensor, name: str = "pixel_values") -> None:
        cfg = self.config
        if self.vision is None and pixel_values.dim() == 3:  # Fuyu's pre-patchified (N, P, p*p*C)
            n = cfg.tokens_per_image if self.patch_pos is not None else "P"
            if pixel_values.shape[-1] != cfg.patch_size ** 2 * cfg.channels or (
                    self.patch_pos is not None and pixel_values.shape[1] != n):
                raise ValueError(f"{name} given as patches must be (N, {n}, {cfg.patch_size ** 2 * cfg.channels}), "
                                 f"got {tuple(pixel_values.shape)}")
            return
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"{name} must be (num_images, {', '.join(map(str, expected))}), "
                             f"got {tuple(pixel_values.shape)}")

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images (or (N, P, p*p*C) patches) -> (N, P, D)."""
        dtype = self.image_proj.weight.dtype
        if self.vision is not None:
            features = self.vision(pixel_values.to(dtype)).features
        else:
            features = pixel_values if pixel_values.dim() == 3 else self.patchify(pixel_values)
        x = self.image_proj(features.to(dtype))
        if self.patch_pos is not None:
            x = x + self.patch_pos.weight
        return self.image_norm(x)

    def embed_audio(self, input_features: torch.Tensor) -> torch.Tensor:
        """(N, n_mels, T) log-mel -> (N, T / 2 / audio_pool, D)."""
        x = self.audio(input_features)  # (N, T/2, audio dim)
        if self.config.audio_pool > 1:
            x = F.avg_pool1d(x.transpose(1, 2), self.config.audio_pool).transpose(1, 2)
        return self.audio_norm(self.audio_proj(x))

    def embed_videos(self, videos: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each (F, C, H, W) -> (F * P, D): its frames embedded as images, plus their temporal embedding."""
        frames = self.embed_images(torch.cat(videos))  # every frame of every video at once: (sum F, P, D)
        out, start = [], 0
        for v in videos:
            f = v.shape[0]
            time = self.frame_embed(torch.arange(f, device=frames.device))[:, None, :]  # (F, 1, D)
            out.append((frames[start:start + f] + time).flatten(0, 1))
            start += f
        return out

    # -- the stream --------------------------------------------------------------------------------

    def spans(self, input_ids: torch.Tensor) -> list[Span]:
        """Media spans in row-major order. Each placeholder must sit in a span `start P* end` of its
        modality (with unwrapped images, each run of placeholders is one image span)."""
        tok = self.config.tokens
        starts = {getattr(tok, k)[0]: (k, getattr(tok, k)[1]) for k in MODALITIES if getattr(tok, k) is not None}
        ends = {getattr(tok, k)[1]: k for k in MODALITIES if getattr(tok, k) is not None}
        out = []
        for b, row in enumerate(input_ids.tolist()):
            i, S = 0, len(row)
            while i < S:
                t = row[i]
                if t in starts or (t == tok.placeholder and not tok.wrapped):
                    kind, end = starts[t] if t in starts else ("image", None)
                    first = i + (t in starts)
                    j = first
                    while j < S and row[j] == tok.placeholder:
                        j += 1
                    if end is not None and (j == S or row[j] != end):
                        found = "the end of the input" if j == S else f"token {row[j]}"
                        raise ValueError(f"row {b}: the {kind} span opened at position {i} must be placeholders "
                                         f"closed by {end}, but {found} follows at position {j}")
                    out.append(Span(kind, b, first, j - first))
                    i = j + (end is not None)
                elif t == tok.placeholder:
                    raise ValueError(f"row {b}: media placeholder at position {i} is outside any media span")
                elif t in ends:
                    raise ValueError(f"row {b}: {ends[t]} span end token at position {i} has no start")
                else:
                    i += 1
        return out

    def media_sizes(self, spans: list[Span], pixel_values: torch.Tensor | None, input_features: torch.Tensor | None,
                    videos: list[torch.Tensor] | None) -> dict[str, list[int]]:
        """Checks the media against the spans before any compute; returns each modality's tokens per media."""
        cfg = self.config
        given = {"image": pixel_values, "audio": input_features, "video": videos}
        if pixel_values is not None:
            self.check_images(pixel_values)
        if input_features is not None:
            if self.audio is None:
                raise ValueError("input_features given, but this model has no audio encoder (config.audio is None)")
            self.audio.check_features(input_features)
        for i, v in enumerate(videos or []):
            if self.frame_embed is None:
                raise ValueError("pixel_values_videos given, but this model takes no video (config.max_frames is 0)")
            if v.dim() != 4:
                raise ValueError(f"video {i} must be (frames, C, H, W), got shape {tuple(v.shape)}")
            if v.shape[0] == 0:
                raise ValueError(f"video {i} has no frames (shape {tuple(v.shape)}); a video needs at least one frame")
            if v.shape[0] > cfg.max_frames:
                raise ValueError(f"video {i} has {v.shape[0]} frames; this model embeds at most "
                                 f"max_frames={cfg.max_frames}")
            self.check_images(v, f"video {i}")
        sizes = {
            "image": [] if pixel_values is None else
            [pixel_values.shape[1] if pixel_values.dim() == 3 else cfg.tokens_per_image] * pixel_values.shape[0],
            "audio": [] if input_features is None else [cfg.tokens_per_clip] * input_features.shape[0],
            "video": [v.shape[0] * cfg.tokens_per_image for v in videos or []],
        }
        names = {"image": "pixel_values", "audio": "input_features", "video": "pixel_values_videos"}
        plural = {"image": "images", "audio": "audio clips", "video": "videos"}
        for kind in MODALITIES:
            of_kind = [s for s in spans if s.kind == kind]
            if kind == "image" and not cfg.tokens.wrapped:  # Fuyu: one stream of image tokens, matched in total
                n_tokens, n_embeds = sum(s.length for s in of_kind), sum(sizes[kind])
                if n_tokens != n_embeds:
                    raise ValueError(f"input_ids hold {n_tokens} image placeholder tokens but pixel_values gives "
                                     f"{n_embeds} image embeddings")
                continue
            if given[kind] is not None and getattr(cfg.tokens, kind) is None:
                raise ValueError(f"{names[kind]} given, but the config has no {kind} span tokens (tokens.{kind})")
            if len(of_kind) != len(sizes[kind]):
                raise ValueError(f"input_ids hold {len(of_kind)} {kind} spans but {names[kind]} holds "
                                 f"{len(sizes[kind])} {plural[kind]}")
            for n, (span, expected) in enumerate(zip(of_kind, sizes[kind])):
                if span.length != expected:
                    raise ValueError(f"{kind} span {n} (row {span.row}, position {span.start}) holds {span.length} "
                                     f"placeholder tokens but its {kind} gives {expected} embeddings")
        return sizes

    def embed_media(self, spans: list[Span], sizes: dict[str, list[int]], pixel_values: torch.Tensor | None,
                    input_features: torch.Tensor | None, videos: list[torch.Tensor] | None) -> torch.Tensor:
        """(sum of span lengths, D): every media encoded once, laid out in span order."""
        per_media: dict[str, list[torch.Tensor]] = {k: [] for k in MODALITIES}
        if pixel_values is not None:
            per_media["image"] = list(self.embed_images(pixel_values).flatten(0, 1).split(sizes["image"]))
        if input_features is not None:
            per_media["audio"] = list(self.embed_audio(input_features).unbind(0))
        if videos:
            per_media["video"] = self.embed_videos(videos)
        if not self.config.tokens.wrapped:  # runs of image tokens, however the images were cut
            return torch.cat(per_media["image"])
        queues = {k: iter(v) for k, v in per_media.items()}
        return torch.cat([next(queues[s.kind]) for s in spans])

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | list[torch.Tensor] | None = None, *,
                target_pixel_values: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: Cache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (B, S) with media spans; pixel_values (N, C, H, W) images (or (N, P, p*p*C) patches
        without a ViT), input_features (N, n_mels, T) log-mel clips, pixel_values_videos (N, F, C, H, W)
        or a list of (F, C, H, W): each modality's media in the order of its spans, row by row;
        target_pixel_values (N, 3, H, W) in [-1, 1]: the images to write, as placeholders in `tokens.draw` spans."""
        media = (pixel_values, input_features, pixel_values_videos, target_pixel_values)
        if cache is not None and cache.length > 0:  # decode: media were encoded at prefill
            if any(m is not None for m in media):
                raise ValueError("media belong to the first (prefill) call, not to decode steps")
            return self.decoder(input_ids, cache=cache, labels=labels, logits_to_keep=logits_to_keep)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if S > self.config.text.max_seq_len:
            raise ValueError(f"sequence of {S} tokens exceeds max_seq_len={self.config.text.max_seq_len}")
        self.decoder.check_token_ids(input_ids)
        if self.writer is not None:
            input_ids, labels = self.writer.splice(input_ids, target_pixel_values, labels)
        elif target_pixel_values is not None:
            raise ValueError("target_pixel_values given, but this model writes no images (config.vq is None)")
        videos = list(pixel_values_videos) if pixel_values_videos is not None else None
        spans = self.spans(input_ids)
        sizes = self.media_sizes(spans, pixel_values, input_features, videos)
        embeds = self.decoder.tok_embeddings(input_ids)
        if spans:
            feats = self.embed_media(spans, sizes, pixel_values, input_features, videos)
            if self.config.text.embed_scale:  # cancel the decoder's sqrt(dim): media enter as encoded
                feats = feats / math.sqrt(self.config.text.dim)
            is_media = input_ids == self.config.tokens.placeholder
            embeds = embeds.masked_scatter(is_media[..., None], feats.to(embeds.dtype))
        seg = make_segments(B, S, embeds.device, attention_mask=attention_mask, document_ids=document_ids,
                            position_ids=position_ids)
        plain = all(t is None for t in (attention_mask, document_ids))
        h = self.decoder.hidden_states(embeds, seg, cache=cache, plain_causal=plain)
        return self.decoder.head(h, labels, logits_to_keep)


class GeminiFormat:
    """Documents -> the Gemini stream: <bos>, then the segments in document order, each text segment
    ended by "\\n" (the last by <eos>) and each media a span `<img> P*n </img>` (`<audio>`, `<video>`);
    labels on target text and, for a model with image output (vq), on target images: `tokens.draw` spans
    whose placeholders the model fills with the image's VQ codes (`models/drawing.py`). Images (and video
    frames) are resized to image_size and scaled to [-1, 1]; audio becomes Whisper log-mel, and must come at
    the encoder's sampling rate and fit its window (a longer clip is an error, never cut silently)."""

    def __init__(self, config: GeminiConfig, tokenizer):
        from polymodal.data.collate import SEPARATOR
        from polymodal.data.processors import AudioFeatureExtractor, ImageProcessor

        self.config, self.tokenizer = config, tokenizer
        self.sep = tokenizer.encode(SEPARATOR)
        self.max_len = config.text.max_seq_len
        self.images = ImageProcessor(size=(config.image_size, config.image_size), resample="bicubic")
        a = config.audio
        self.audio = (AudioFeatureExtractor(a.n_mels, a.sampling_rate, a.hop_length, a.n_fft,
                                            a.chunk_samples // a.sampling_rate) if a is not None else None)

    @staticmethod
    def fit(config: GeminiConfig, tokenizer) -> GeminiConfig:
        from polymodal.data.collate import DecoderFormat

        ids, V = tokenizer.special_ids, tokenizer.vocab_size
        tokens = MediaTokens(placeholder=ids["<image>"], image=(ids["<img>"], ids["</img>"]),
                             audio=(ids["<audio>"], ids["</audio>"]), video=(ids["<video>"], ids["</video>"]))
        text = DecoderFormat.fit(config.text, tokenizer)
        if config.vq is None:
            return config.replace(text=text, tokens=tokens)
        # written images: their begin and end tokens, then the VQ codes, right after the tokenizer's vocabulary
        return config.replace(text=text.replace(vocab_size=V + 2 + config.vq.num_embeddings),
                              tokens=tokens.replace(draw=(V, V + 1)), image_codes=V + 2)

    def encode(self, doc, prompt_only: bool = False):
        from polymodal.data.collate import Encoded, _labels, _name, _prompt

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
            raise ValueError(f"{name} has a {seg.kind} target; this model reads media and writes text"
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
                raise ValueError(f"{name} has an audio segment but this model has no audio encoder")
            clip = seg.media
            if len(clip.waveform) > self.audio.n_samples:  # refused: the extractor would cut it silently
                raise ValueError(f"{name} has an audio clip of {len(clip.waveform) / clip.sample_rate:g} s; the "
                                 f"audio encoder hears at most {self.audio.chunk_length} s: cut it into clips")
            features = self.audio(clip.waveform, sampling_rate=clip.sample_rate)
            return "input_features", features[None], cfg.tokens_per_clip
        frames = list(seg.media or [])
        if not frames:
            raise ValueError(f"{name} has a video with no frames; a video needs at least one frame")
        if len(frames) > cfg.max_frames:
            raise ValueError(f"{name} has a video of {len(frames)} frames; this model embeds at most "
                             f"max_frames={cfg.max_frames}")
        return "pixel_values_videos", self.images(frames)[None], len(frames) * cfg.tokens_per_image


# -- presets ---------------------------------------------------------------------------------------

def gemini_tiny() -> GeminiConfig:
    """For tests and the built-in world: 32x32 images as 16 linear-embedded patches with learned patch
    positions, 1 s audio clips
    (80 mels, 50 encoder frames pooled to 25 tokens), videos of up to 4 frames (64 tokens); a GQA,
    qk-norm decoder initialised at N(0, dim**-0.5) (as paligemma-world: it learns to read media sooner).
    It writes 32x32 images as 8x8 codes of a 128-entry VQ codebook (chameleon-tiny's VQ), held by the last
    128 tokens. Media token ids are the built-in tokenizer's; `GeminiFormat.fit` sets them and puts the
    written images' begin and end tokens and the codes after the tokenizer's vocabulary."""
    dim = 128
    text = DecoderConfig(vocab_size=512, dim=dim, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=384,
                         qk_norm="rmsnorm", max_seq_len=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         init_std=dim ** -0.5)
    audio = AudioConfig(n_mels=80, n_positions=50, dim=64, n_layers=2, n_heads=4, hidden_dim=128)
    vq = VQConfig(resolution=32, base_channels=16, channel_multiplier=[1, 2, 2], num_res_blocks=1, mid_attn=False,
                  latent_channels=32, embed_dim=32, num_embeddings=128, norm_groups=8)
    return GeminiConfig(text=text, tokens=MediaTokens(draw=(382, 383)), image_size=32, patch_size=8,
                        patch_positions=True, audio=audio, audio_pool=2, max_frames=4, vq=vq, image_codes=384)


def _gemini_nano(dim: int, n_layers: int, n_heads: int, hidden_dim: int) -> GeminiConfig:
    text = DecoderConfig(vocab_size=256000, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=1, head_dim=256,
                         hidden_dim=hidden_dim, mlp="geglu", norm="rmsnorm", tie_embeddings=True, max_seq_len=32768,
                         pad_token_id=0, bos_token_id=2, eos_token_id=1)
    audio = AudioConfig(n_mels=80, n_positions=1500, dim=768, n_layers=12, n_heads=12, hidden_dim=3072)
    return GeminiConfig(text=text, tokens=MediaTokens(placeholder=255999, image=(255993, 255994),
                                                      audio=(255995, 255996), video=(255997, 255998)),
                        image_size=448, patch_size=14, audio=audio, audio_pool=4, max_frames=16)


def gemini_nano_1() -> GeminiConfig:
    """Gemini Nano-1 (1.8B parameters; the report gives only the count). Assumed shapes: a Gemma-style
    decoder (RMSNorm, GeGLU, RoPE, multi-query attention with 256-wide heads, 256k tied vocabulary,
    32k context) of width 2048, 18 layers, 8 heads, MLP 9216; images of 448x448 as 1024 linear-embedded
    14x14 patches (Fuyu-style: the report names no image encoder); audio through a Whisper-small-sized
    encoder (768 wide, 12 layers; 30 s at 16 kHz) pooled 4x to 375 tokens; videos of up to 16 frames.
    The last vocabulary ids are the media tokens. 1.80B parameters in all."""
    return _gemini_nano(dim=2048, n_layers=18, n_heads=8, hidden_dim=9216)


def gemini_nano_2() -> GeminiConfig:
    """Gemini Nano-2 (3.25B parameters): Nano-1's assumptions with a decoder of width 2560, 26 layers,
    10 heads, MLP 10752. 3.27B parameters in all."""
    return _gemini_nano(dim=2560, n_layers=26, n_heads=10, hidden_dim=10752)
