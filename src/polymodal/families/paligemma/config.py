"""PaliGemma's config: the model file (`model.py`) says what the fields mean."""

from __future__ import annotations

from dataclasses import dataclass

from polymodal.config import Config, ConfigError, DecoderConfig
from polymodal.encoders.mask_vae import MaskVAEConfig
from polymodal.encoders.vit import VisionConfig


@dataclass
class PaliGemmaConfig(Config):
    """The projector maps vision.dim to text.dim (HF's projection_dim, which must equal the text width).

    image_token_id: the placeholder id, inside text.vocab_size. A trainer with its own tokenizer
    sets both: `cfg.replace(text=cfg.text.replace(vocab_size=...), image_token_id=tok.token_id("<image>"))`.

    mask_vae: the mask VQ-VAE whose codes the model writes as `<segNNN>` tokens, held (and saved) with the model;
    None: none (HF's checkpoints keep it in a file of its own, `vae-oid.npz`)."""

    vision: VisionConfig
    text: DecoderConfig
    image_token_id: int = 257152
    mask_vae: MaskVAEConfig | None = None

    def __post_init__(self) -> None:
        if self.vision.variant != "siglip":
            raise ConfigError(f"PaliGemma's vision tower is a SigLIP ViT, got variant {self.vision.variant!r}")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(f"image_token_id ({self.image_token_id}) must be a token id below text.vocab_size "
                              f"({self.text.vocab_size})")

    @property
    def tokens_per_image(self) -> int:
        return self.vision.n_patches

    def at_image_size(self, image_size: int) -> PaliGemmaConfig:
        """This config reading image_size x image_size images: give it to a collator (`make_collator`) to lay
        prompts out at that size for a model called with `interpolate_pos_encoding=True`."""
        return self.replace(vision=self.vision.replace(image_size=image_size))
