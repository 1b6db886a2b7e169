"""The CLIP / SigLIP dual encoders' config: an image tower, a text tower, and their loss (`model.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from polymodal.config import Config, ConfigError, _check_choice, _check_positive
from polymodal.encoders.text import TextConfig
from polymodal.encoders.vit import VisionConfig


@dataclass
class ContrastiveConfig(Config):
    vision: VisionConfig
    text: TextConfig
    projection_dim: int | None = None  # CLIP's visual/text projections; None: pooled outputs as they are (SigLIP)
    loss: str = "softmax"  # "softmax" (CLIP) | "sigmoid" (SigLIP)
    logit_scale_init: float = 2.6592  # log(1 / 0.07) (CLIP); SigLIP starts at log(10)
    logit_bias_init: float = -10.0  # sigmoid loss only

    def __post_init__(self) -> None:
        _check_choice("loss", self.loss, ("softmax", "sigmoid"))
        _check_positive(self, "projection_dim")
        if self.vision.variant == "siglip" and not self.vision.pooling_head:
            raise ConfigError("a SigLIP image tower embeds an image with its pooling head: vision.pooling_head "
                              "must be True")
        if self.projection_dim is None and self.vision.dim != self.text.out_dim:
            raise ConfigError(f"without projections image and text embeddings need one width, got vision.dim="
                              f"{self.vision.dim} and a text output of {self.text.out_dim}; set projection_dim")
