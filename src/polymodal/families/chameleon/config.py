"""Chameleon's config: the model file (`model.py`) says what the fields mean."""

from __future__ import annotations

from dataclasses import dataclass, field

from polymodal.config import Config, ConfigError, DecoderConfig
from polymodal.encoders.vq import VQConfig

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
