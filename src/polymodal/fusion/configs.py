"""The configs of the early-fusion families (PaliGemma, KOSMOS-1, Chameleon, Gemini).

They live below the models (`models/`) and the document formats (`data/formats.py`), which both read
them, so a format never imports a model module. Each family's model file says what the fields mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from polymodal.config import Config, ConfigError, DecoderConfig
from polymodal.encoders.vit import VisionConfig
from polymodal.encoders.vq import VQConfig
from polymodal.fusion.perceiver import PerceiverConfig


@dataclass
class PaliGemmaConfig(Config):
    """The projector maps vision.dim to text.dim (HF's projection_dim, which must equal the text width).

    image_token_id: the placeholder id, inside text.vocab_size. A trainer with its own tokenizer
    sets both: `cfg.replace(text=cfg.text.replace(vocab_size=...), image_token_id=tok.token_id("<image>"))`."""

    vision: VisionConfig
    text: DecoderConfig
    image_token_id: int = 257152

    def __post_init__(self) -> None:
        if self.vision.variant != "siglip":
            raise ConfigError(f"PaliGemma's vision tower is a SigLIP ViT, got variant {self.vision.variant!r}")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(f"image_token_id ({self.image_token_id}) must be a token id below text.vocab_size "
                              f"({self.text.vocab_size})")

    @property
    def tokens_per_image(self) -> int:
        return self.vision.n_patches


@dataclass
class KosmosConfig(Config):
    vision: VisionConfig  # a CLIP ViT
    perceiver: PerceiverConfig  # over the vision width; n_latents = tokens per image
    text: DecoderConfig  # the Magneto decoder (`magneto_text`)
    image_token_id: int = 4  # `<image>`: starts an image (ids of `Tokenizer.train`'s control tokens)
    image_end_token_id: int = 5  # `</image>`: closes it
    placeholder_token_id: int = 0  # written in the n_image_latents slots whose embeddings an image replaces

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


def _chameleon_text() -> DecoderConfig:
    return DecoderConfig(qk_norm="layernorm", qk_norm_per_head=True, norm_eps=1e-5)


@dataclass
class ChameleonConfig(Config):
    text: DecoderConfig = field(default_factory=_chameleon_text)
    vq: VQConfig = field(default_factory=VQConfig)
    image_tokens: int | list[int] = 256  # token id of VQ code 0 (codes contiguous from it), or the token of each code
    image_token_id: int | None = None  # input placeholder filled with an input image's codes (HF `<image>`)
    begin_image_id: int | None = None  # `<img>`; None (with end_image_id): the model never writes images
    end_image_id: int | None = None  # `</img>`

    def __post_init__(self) -> None:
        V, K = self.text.vocab_size, self.vq.num_embeddings
        if isinstance(self.image_tokens, int):
            if not 0 <= self.image_tokens <= V - K:
                raise ConfigError(f"image_tokens: the {K} image codes from token {self.image_tokens} must fit in "
                                  f"the vocabulary of {V}")
        else:
            tokens = self.image_tokens
            if len(tokens) != K or len(set(tokens)) != K or not all(0 <= t < V for t in tokens):
                raise ConfigError(f"image_tokens must list {K} distinct token ids in [0, {V}), one per VQ code; "
                                  f"got {len(tokens)} ids")
        codes = set(self.code_tokens)
        for name in ("image_token_id", "begin_image_id", "end_image_id"):
            value = getattr(self, name)
            if value is not None and (not 0 <= value < V or value in codes):
                raise ConfigError(f"{name} must be a token in [0, {V}) that is not an image code, got {value}")
        if (self.begin_image_id is None) != (self.end_image_id is None):
            raise ConfigError("give both begin_image_id and end_image_id, or neither")

    @property
    def code_tokens(self) -> list[int]:
        """The token id of each VQ code, in code order."""
        if isinstance(self.image_tokens, int):
            return list(range(self.image_tokens, self.image_tokens + self.vq.num_embeddings))
        return list(self.image_tokens)
