"""Every family, one line each, in one literal dict (no registration by import side effects).

`spec_of(config_or_model)` is how shared machinery finds a family's spec.
"""

from __future__ import annotations

from polymodal.config import Config, ConfigError, DecoderConfig
from polymodal.data.formats import ChameleonFormat, DecoderFormat, GeminiFormat, KosmosFormat, PaliGemmaFormat
from polymodal.data.interleaved import InterleavedCollator, InterleavedFormat
from polymodal.data.pairs import PairCollator, PairFormat
from polymodal.encoders.audio import AudioConfig, AudioEncoder
from polymodal.encoders.vit import ViT, VisionConfig
from polymodal.encoders.vq import VQConfig, VQModel
from polymodal.families.spec import FamilySpec
from polymodal.models.chameleon import Chameleon, ChameleonConfig
from polymodal.models.contrastive import ContrastiveConfig, DualEncoder
from polymodal.models.flamingo import Flamingo, FlamingoConfig
from polymodal.models.gemini import Gemini, GeminiConfig
from polymodal.models.kosmos import Kosmos, KosmosConfig
from polymodal.models.paligemma import PaliGemma, PaliGemmaConfig
from polymodal.nn.transformer import Decoder

FAMILIES: dict[str, FamilySpec] = {
    "decoder": FamilySpec(DecoderConfig, Decoder, DecoderFormat),
    "paligemma": FamilySpec(PaliGemmaConfig, PaliGemma, PaliGemmaFormat, per_token_inputs=("token_type_ids",),
                            placeholders=lambda c: (c.image_token_id,), needs_image=True),
    "flamingo": FamilySpec(FlamingoConfig, Flamingo, InterleavedFormat, InterleavedCollator,
                           per_token_inputs=("media_locations", "image_attention_mask")),
    "kosmos": FamilySpec(KosmosConfig, Kosmos, KosmosFormat, placeholders=lambda c: (c.placeholder_token_id,)),
    "gemini": FamilySpec(GeminiConfig, Gemini, GeminiFormat, placeholders=lambda c: (c.tokens.placeholder,)),
    "chameleon": FamilySpec(ChameleonConfig, Chameleon, ChameleonFormat),
    "contrastive": FamilySpec(ContrastiveConfig, DualEncoder, PairFormat, PairCollator, pairs=True),
    "vit": FamilySpec(VisionConfig, ViT),
    "audio": FamilySpec(AudioConfig, AudioEncoder),
    "vq": FamilySpec(VQConfig, VQModel),
}

_BY_CONFIG = {spec.config: spec for spec in FAMILIES.values()}


def spec_of(config_or_model) -> FamilySpec:
    """The spec of a config, or of a model built from one (read from its `.config`)."""
    config = config_or_model if isinstance(config_or_model, Config) else getattr(config_or_model, "config", None)
    if type(config) not in _BY_CONFIG:
        raise ConfigError(f"{type(config_or_model).__name__} is no polymodal family; known configs: "
                          f"{sorted(c.__name__ for c in _BY_CONFIG)}")
    return _BY_CONFIG[type(config)]
