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
import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import DecoderConfig
from polymodal.encoders.audio import AudioConfig, AudioEncoder
from polymodal.encoders.vit import ViT
from polymodal.encoders.vq import VQConfig
from polymodal.errors import InputError, check_media, check_pixel_values, check_tensors
from polymodal.fusion.configs import MODALITIES, GeminiConfig, MediaTokens
from polymodal.models import fusion
from polymodal.models.drawing import ImageWriter
from polymodal.models.parts import set_trainable
from polymodal.nn.cache import Cache
from polymodal.nn.norms import make_norm
from polymodal.nn.transformer import Decoder, ModelOutput
from polymodal.nn.language_model import LanguageModel


class Gemini(LanguageModel, nn.Module):
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
        check_tensors(**{name: pixel_values})
        if self.vision is None and pixel_values.dim() == 3:  # Fuyu's pre-patchified (N, P, p*p*C)
            n = cfg.tokens_per_image if self.patch_pos is not None else "P"
            check_media(f"{name} given as patches", pixel_values, ("N", n, cfg.patch_size ** 2 * cfg.channels))
            return
        check_pixel_values(pixel_values, cfg.channels, cfg.image_size, name=name)

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

    def spans(self, input_ids: torch.Tensor) -> fusion.Spans:
        """Media spans in row-major order, kinds indexing MODALITIES. Each placeholder must sit in a span
        `start P* end` of its modality (with unwrapped images, each run of placeholders is one image span)."""
        tok = self.config.tokens
        if not tok.wrapped:
            return fusion.runs(input_ids == tok.placeholder)
        return fusion.wrapped_spans(input_ids, tok.placeholder, [getattr(tok, k) for k in MODALITIES], list(MODALITIES))

    def media_sizes(self, spans: fusion.Spans, pixel_values: torch.Tensor | None, input_features: torch.Tensor | None,
                    videos: list[torch.Tensor] | None) -> dict[str, list[int]]:
        """Checks the media against the spans before any compute; returns each modality's tokens per media."""
        cfg = self.config
        given = {"image": pixel_values, "audio": input_features, "video": videos}
        if pixel_values is not None:
            self.check_images(pixel_values)
        if input_features is not None:
            if self.audio is None:
                raise InputError("input_features given, but this model has no audio encoder (config.audio is None)")
            self.audio.check_features(input_features)
        for i, v in enumerate(videos or []):
            if self.frame_embed is None:
                raise InputError("pixel_values_videos given, but this model takes no video (config.max_frames is 0)")
            if v.dim() != 4:
                raise InputError(f"video {i} must be (frames, C, H, W), got shape {tuple(v.shape)}")
            if v.shape[0] == 0:
                raise InputError(f"video {i} has no frames (shape {tuple(v.shape)}); a video needs at least one frame")
            if v.shape[0] > cfg.max_frames:
                raise InputError(f"video {i} has {v.shape[0]} frames; this model embeds at most "
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
        for k, kind in enumerate(MODALITIES):
            if kind == "image" and not cfg.tokens.wrapped:  # Fuyu: one stream of image tokens, matched in total
                fusion.check_total(spans, sum(sizes[kind]), "image placeholder tokens",
                                   f"pixel_values gives {sum(sizes[kind])} image embeddings")
                continue
            if given[kind] is not None and getattr(cfg.tokens, kind) is None:
                raise InputError(f"{names[kind]} given, but the config has no {kind} span tokens (tokens.{kind})")
            fusion.check_spans(spans.of(k), sizes[kind], kind, names[kind], plural[kind])
        return sizes

    def embed_media(self, spans: fusion.Spans, sizes: dict[str, list[int]], pixel_values: torch.Tensor | None,
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
        queues = [iter(per_media[k]) for k in MODALITIES]
        return torch.cat([next(queues[k]) for k in spans.kinds.tolist()])

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | list[torch.Tensor] | None = None, *,
                target_pixel_values: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: Cache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (B, S) with media spans; pixel_values (N, C, H, W) images (or (N, P, p*p*C) patches
        without a ViT), input_features (N, n_mels, T) log-mel clips, pixel_values_videos (N, F, C, H, W)
        or a list of (F, C, H, W): each modality's media in the order of its spans, row by row;
        target_pixel_values (N, 3, H, W) in [-1, 1]: the images to write, as placeholders in `tokens.draw` spans."""
        if fusion.decoding(cache, pixel_values=pixel_values, input_features=input_features,
                           pixel_values_videos=pixel_values_videos, target_pixel_values=target_pixel_values):
            return self.decoder(input_ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids,
                                document_ids=document_ids, labels=labels, logits_to_keep=logits_to_keep)
        fusion.check_inputs(self.decoder, input_ids)
        if self.writer is not None:
            input_ids, labels = self.writer.splice(input_ids, target_pixel_values, labels)
        elif target_pixel_values is not None:
            raise InputError("target_pixel_values given, but this model writes no images (config.vq is None)")
        videos = list(pixel_values_videos) if pixel_values_videos is not None else None
        spans = self.spans(input_ids)
        sizes = self.media_sizes(spans, pixel_values, input_features, videos)
        embeds = self.decoder.tok_embeddings(input_ids)
        if len(spans):
            feats = self.embed_media(spans, sizes, pixel_values, input_features, videos)
            if self.config.text.embed_scale:  # cancel the decoder's sqrt(dim): media enter as encoded
                feats = feats / math.sqrt(self.config.text.dim)
            embeds = fusion.scatter(embeds, spans, feats)
        return fusion.prefill(self.decoder, embeds, attention_mask=attention_mask, document_ids=document_ids,
                              position_ids=position_ids, labels=labels, cache=cache, logits_to_keep=logits_to_keep)


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
