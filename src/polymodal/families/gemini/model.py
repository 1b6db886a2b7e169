"""Gemini-style early fusion (Gemini Team 2023): one decoder reads a single interleaved stream of text
tokens, image patches, audio features and video frames.

Each media span in `input_ids` is a run of placeholder tokens, wrapped in its modality's tokens
(`<img> ... </img>`, `<audio> ... </audio>`, `<video> ... </video>`); the placeholders are replaced
by the media embeddings before the first block (no cross-attention). Images enter either as
patches through one linear layer, as in Fuyu (Bavishi et al. 2023; HF `FuyuForCausalLM`, which
this model matches weight for weight through `convert.py`), or through the ViT. Audio
(16 kHz log-mel) goes through the encoder the config chooses (`audio_encoder`): the Whisper-style
`AudioEncoder`, or USM's Conformer (the Gemini report's USM features; `encoders/conformer.py`, Gemma 3n's
audio tower); video is its frames, each embedded
as an image plus a learned temporal embedding. Media are encoded once, at prefill; decode steps
take text only.

A config with `vq` also writes images, as discrete VQ codes that are ordinary vocabulary entries
(Chameleon-style, the one `fusion/writer.py`): `<draw>` codes `</draw>`, its own span tokens, apart from
the input `<img>` spans.

The model is a declaration on the early-fusion core (`fusion/early.py`): its encoders, and one table
entry per modality. A config without modality tokens (Fuyu) reads images as bare runs of placeholders,
in order, however they are cut; whether spans are wrapped is read from the config there only, and whether
images come as patches in `is_patches` only.

Shapes: B batch, S tokens, N media, F frames, P tokens per media, D decoder width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.audio import AudioEncoder
from polymodal.encoders.conformer import ConformerEncoder
from polymodal.encoders.vit import ViT
from polymodal.errors import InputError, check_media, check_pixel_values
from polymodal.families.gemini.config import GeminiConfig
from polymodal.fusion.early import EarlyFusion, Modality
from polymodal.fusion.spans import Span
from polymodal.fusion.writer import ImageWriter
from polymodal.models.parts import set_trainable
from polymodal.nn.norms import make_norm
from polymodal.nn.transformer import Decoder, ModelOutput


AUDIO_ENCODERS = {"whisper": AudioEncoder, "usm": ConformerEncoder}  # by config.audio_encoder


class Gemini(EarlyFusion, nn.Module):
    writes = "target_pixel_values"

    def __init__(self, config: GeminiConfig, *, backend: str = "sdpa"):
        super().__init__()
        cfg = self.config = config
        dim = cfg.text.dim
        self.vision = ViT(cfg.vision) if cfg.vision is not None else None
        patch_in = cfg.vision.dim if cfg.vision is not None else cfg.patch_size ** 2 * cfg.channels
        self.image_proj = nn.Linear(patch_in, dim)  # Fuyu's vision_embed_tokens when there is no ViT
        self.patch_pos = nn.Embedding(cfg.tokens_per_image, dim) if cfg.patch_positions else None
        hears = cfg.audio_tower
        self.audio = AUDIO_ENCODERS[cfg.audio_encoder](hears) if hears is not None else None
        self.audio_proj = nn.Linear(hears.dim, dim) if hears is not None else None
        self.frame_embed = nn.Embedding(cfg.max_frames, dim) if cfg.max_frames else None
        self.image_norm, self.audio_norm = self._modal_norm(), self._modal_norm()
        for module in (self.image_proj, self.patch_pos, self.audio_proj, self.frame_embed):
            if module is not None:
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        self.decoder = Decoder(cfg.text, backend=backend)
        self.writer = (ImageWriter(cfg.vq, range(cfg.image_codes, cfg.image_codes + cfg.vq.num_embeddings),
                                   begin=cfg.tokens.draw[0], end=cfg.tokens.draw[1], blank=cfg.tokens.placeholder,
                                   opened=True, key=self.writes) if cfg.vq is not None else None)
        self.modalities = self.table()

    def table(self) -> tuple[Modality, ...]:
        """One entry per modality this config reads: images always, audio with an encoder, video with frames."""
        tok = self.config.tokens
        span = lambda kind: Span(tok.placeholder, getattr(tok, kind))  # noqa: E731 (None: a bare run, Fuyu)
        rows = [Modality("image", "pixel_values", "embed_images", span("image"), self.image_tokens,
                         check=self.check_images)]
        if self.audio is not None and tok.audio is not None:
            rows.append(Modality("audio", "input_features", "embed_audio", span("audio"), self.config.tokens_per_clip,
                                 plural="audio clips", check=self.check_audio))
        if self.frame_embed is not None and tok.video is not None:
            rows.append(Modality("video", "pixel_values_videos", "embed_videos", span("video"), self.video_tokens,
                                 check=self.check_videos))
        return tuple(rows)

    def _modal_norm(self) -> nn.Module:
        t = self.config.text
        return make_norm(t.norm, t.dim, t.norm_eps) if self.config.modal_norm else nn.Identity()

    def trainable(self, parts: tuple[str, ...] | list[str]) -> None:
        """Train exactly these parts (any of "vision", "audio", "projectors", "decoder"); freeze the rest."""
        set_trainable({"vision": [self.vision], "audio": [self.audio],
                       "projectors": [self.image_proj, self.patch_pos, self.audio_proj, self.frame_embed,
                                      self.image_norm, self.audio_norm],
                       "decoder": [self.decoder]}, parts)

    # -- media: checks, token counts and encoders (each encoder gives (N, P, D) or a list of (P, D)) -------

    def is_patches(self, pixel_values: torch.Tensor) -> bool:
        """Without a ViT, images may come pre-patchified (N, P, p*p*C), as Fuyu's processor gives them."""
        return self.vision is None and pixel_values.dim() == 3

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, H/p * W/p, p*p*C) row-major patches, each flattened (row, column, channel)
        as HF's FuyuImageProcessor does."""
        p = self.config.patch_size
        N, C, H, W = pixel_values.shape
        patches = pixel_values.unfold(2, p, p).unfold(3, p, p)  # (N, C, H/p, W/p, p, p)
        return patches.permute(0, 2, 3, 4, 5, 1).reshape(N, (H // p) * (W // p), p * p * C)

    def check_images(self, pixel_values: torch.Tensor, name: str = "pixel_values") -> None:
        cfg = self.config
        if self.is_patches(pixel_values):
            n = cfg.tokens_per_image if self.patch_pos is not None else "P"
            check_media(f"{name} given as patches", pixel_values, ("N", n, cfg.patch_size ** 2 * cfg.channels))
            return
        check_pixel_values(pixel_values, cfg.channels, cfg.image_size, name=name)

    def image_tokens(self, pixel_values: torch.Tensor) -> list[int]:
        n = pixel_values.shape[1] if self.is_patches(pixel_values) else self.config.tokens_per_image
        return [n] * pixel_values.shape[0]

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images (or (N, P, p*p*C) patches) -> (N, P, D)."""
        dtype = self.image_proj.weight.dtype
        if self.vision is not None:
            features = self.vision(pixel_values.to(dtype)).features
        else:
            features = pixel_values if self.is_patches(pixel_values) else self.patchify(pixel_values)
        x = self.image_proj(features.to(dtype))
        if self.patch_pos is not None:
            x = x + self.patch_pos.weight
        return self.image_norm(x)

    def check_audio(self, input_features: torch.Tensor) -> None:
        if self.config.audio_encoder == "usm":  # clips padded to one window, so that each gives tokens_per_clip
            cfg = self.config
            check_media("input_features", input_features, ("num_clips", cfg.usm_mel_frames, cfg.usm.n_mels),
                        f"USM log-mel frames of {cfg.usm_seconds} s")
        else:
            self.audio.check_features(input_features)

    def embed_audio(self, input_features: torch.Tensor) -> torch.Tensor:
        """(N, n_mels, T) Whisper log-mel, or (N, T, n_mels) USM log-mel -> (N, tokens_per_clip, D)."""
        x = self.audio(input_features)  # (N, encoder_frames, audio dim)
        if self.config.audio_encoder == "usm":
            x = x.states  # the window's silence is heard as the clip's (no mask): every frame counts
        if self.config.audio_pool > 1:
            x = F.avg_pool1d(x.transpose(1, 2), self.config.audio_pool).transpose(1, 2)
        return self.audio_norm(self.audio_proj(x))

    def check_videos(self, videos) -> None:
        """Each video (F, C, H, W), 1 to max_frames frames; videos (N, F, C, H, W) or a list."""
        for i, v in enumerate(videos):
            if v.dim() != 4:
                raise InputError(f"video {i} must be (frames, C, H, W), got shape {tuple(v.shape)}")
            if v.shape[0] == 0:
                raise InputError(f"video {i} has no frames (shape {tuple(v.shape)}); a video needs at least one frame")
            if v.shape[0] > self.config.max_frames:
                raise InputError(f"video {i} has {v.shape[0]} frames; this model embeds at most "
                                 f"max_frames={self.config.max_frames}")
            self.check_images(v, f"video {i}")

    def video_tokens(self, videos) -> list[int]:
        return [v.shape[0] * self.config.tokens_per_image for v in videos]

    def embed_videos(self, videos) -> list[torch.Tensor]:
        """Each (F, C, H, W) -> (F * P, D): its frames embedded as images, plus their temporal embedding."""
        videos = list(videos)
        frames = self.embed_images(torch.cat(videos))  # every frame of every video at once: (sum F, P, D)
        out, start = [], 0
        for v in videos:
            f = v.shape[0]
            time = self.frame_embed(torch.arange(f, device=frames.device))[:, None, :]  # (F, 1, D)
            out.append((frames[start:start + f] + time).flatten(0, 1))
            start += f
        return out

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | list[torch.Tensor] | None = None, **inputs) -> ModelOutput:
        """input_ids (B, S) with media spans; pixel_values (N, C, H, W) images (or (N, P, p*p*C) patches
        without a ViT), input_features (N, n_mels, T) log-mel clips, pixel_values_videos (N, F, C, H, W)
        or a list of (F, C, H, W): each modality's media in the order of its spans, row by row;
        target_pixel_values (N, 3, H, W) in [-1, 1]: the images to write, as placeholders in `tokens.draw`
        spans; attention_mask, position_ids, document_ids, labels, cache, logits_to_keep: `EarlyFusion.fuse`."""
        return self.fuse(input_ids, pixel_values=pixel_values, input_features=input_features,
                         pixel_values_videos=pixel_values_videos, **inputs)
