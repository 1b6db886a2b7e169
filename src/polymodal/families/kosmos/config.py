"""KOSMOS-1's config: the model file (`model.py`) says what the fields mean."""

from __future__ import annotations

from dataclasses import dataclass

from polymodal.config import Config, ConfigError, DecoderConfig
from polymodal.encoders.vit import VisionConfig
from polymodal.fusion.perceiver import PerceiverConfig


@dataclass
class KosmosConfig(Config):

    vision: VisionConfig  # a CLIP ViT
    perceiver: PerceiverConfig  # over the vision width; n_latents = tokens per image
    text: DecoderConfig  # the Magneto decoder (`magneto_text`)
    image_token_id: int = 4  # `<image>`: starts an image (ids of `Tokenizer.train`'s control tokens)
    image_end_token_id: int = 5  # `</image>`: closes it
    placeholder_token_id: int = 0  # written in the n_image_latents slots whose embeddings an image replaces
    projector_bias: bool = True  # a bias on the linear map from resampled image features to the text width

    def __post_init__(self) -> None:
        ids = {"image_token_id": self.image_token_id, "image_end_token_id": self.image_end_token_id,
               "placeholder_token_id": self.placeholder_token_id}
        for name, value in ids.items():
            if not 0 <= value < self.text.vocab_size:
                raise ConfigError(f"{name} ({value}) must be a token id below text.vocab_size ({self.text.vocab_size})")
        if len(set(ids.values())) != 3:
            raise ConfigError(f"image_token_id, image_end_token_id and placeholder_token_id must differ, got {ids}")
        if self.vision.variant != "clip":
            raise ConfigError(f"KOSMOS-1 reads CLIP features; vision.variant must be 'clip', "
                              f"got {self.vision.variant!r}")
        if self.perceiver.max_media or self.perceiver.max_frames:
            raise ConfigError("KOSMOS-1 resamples each image on its own: perceiver.max_media and max_frames must "
                              f"be 0, got {self.perceiver.max_media} and {self.perceiver.max_frames}")

    @property
    def n_image_latents(self) -> int:
        return self.perceiver.n_latents

    def image_tokens(self) -> list[int]:
        """The ids one image takes in input_ids: <image>, n_image_latents placeholders, </image>."""
        return [self.image_token_id, *[self.placeholder_token_id] * self.n_image_latents, self.image_end_token_id]
