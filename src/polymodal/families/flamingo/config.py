"""Flamingo's config: a decoder LM, an optional vision encoder and Perceiver Resampler, and where the gated
cross-attention blocks go (`model.py` says what the fields mean)."""

from __future__ import annotations

from dataclasses import dataclass, field

from polymodal.config import Config, ConfigError, DecoderConfig, _check_choice, _check_positive
from polymodal.encoders.vit import VisionConfig
from polymodal.families.flamingo.cross_attention import GATES
from polymodal.fusion.perceiver import PerceiverConfig


@dataclass
class FlamingoConfig(Config):
    text: DecoderConfig = field(default_factory=DecoderConfig)
    vision: VisionConfig | None = None  # None: the model takes precomputed image embeddings
    perceiver: PerceiverConfig | None = field(default_factory=PerceiverConfig)  # None: attend to raw features
    media_dim: int | None = None  # width of the media features; None: the vision encoder's width
    cross_attn_every: int = 4  # a gated cross-attention block before LM blocks 0, k, 2k, ...
    cross_attn_heads: int | None = None  # None: text.n_heads (head size text.dim // heads)
    cross_attn_qk_norm: bool = False  # text.norm over each head of q and k (Idefics qk_layer_norms)
    gate: str = "scalar"  # "scalar" | "vector" (one tanh gate per channel)
    media_token_id: int | None = None  # token marking where a media starts (`<image>`): gives media_locations
    extra_vocab: int = 0  # the last rows of the vocabulary that HF Idefics keeps apart (additional_vocab_size)

    def __post_init__(self) -> None:
        _check_positive(self, "media_dim", "cross_attn_every", "cross_attn_heads")
        _check_choice("gate", self.gate, GATES)
        if self.vision is None and self.media_dim is None:
            raise ConfigError("without a vision encoder, give media_dim (the width of the image embeddings)")
        if self.vision is not None and self.media_dim not in (None, self.vision.dim):
            raise ConfigError(f"media_dim ({self.media_dim}) must equal the vision encoder's width ({self.vision.dim})")
        if self.text.dim % self.xattn_heads:
            raise ConfigError(f"text.dim ({self.text.dim}) must be divisible by cross_attn_heads ({self.xattn_heads})")
        if self.media_token_id is not None and not 0 <= self.media_token_id < self.text.vocab_size:
            raise ConfigError(f"media_token_id must be in [0, {self.text.vocab_size}), got {self.media_token_id}")
        if not 0 <= self.extra_vocab < self.text.vocab_size:
            raise ConfigError(f"extra_vocab must be in [0, {self.text.vocab_size}), got {self.extra_vocab}")

    @property
    def feature_dim(self) -> int:
        return self.media_dim or self.vision.dim

    @property
    def xattn_heads(self) -> int:
        return self.cross_attn_heads or self.text.n_heads

    @property
    def n_cross_layers(self) -> int:
        return len(range(0, self.text.n_layers, self.cross_attn_every))
