"""Every family, one line each, in one literal dict (no registration by import side effects).

`spec_of(config_or_model)` is how shared machinery finds a family's spec.
"""

from __future__ import annotations

from polymodal.config import Config, ConfigError, DecoderConfig
from polymodal.data.formats import DecoderFormat
from polymodal.data.interleaved import InterleavedCollator, InterleavedFormat
from polymodal.data.pairs import PairCollator, PairFormat
from polymodal.encoders.audio import AudioConfig, AudioEncoder
from polymodal.encoders.vit import ViT, VisionConfig
from polymodal.encoders.vq import VQConfig, VQModel
from polymodal.families.chameleon.config import ChameleonConfig
from polymodal.families.chameleon.convert import CHAMELEON
from polymodal.families.chameleon.format import ChameleonFormat
from polymodal.families.chameleon.model import Chameleon
from polymodal.families.chameleon.presets import PRESETS as CHAMELEON_PRESETS
from polymodal.families.gemini.config import GeminiConfig
from polymodal.families.gemini.convert import FUYU
from polymodal.families.gemini.format import GeminiFormat
from polymodal.families.gemini.model import Gemini
from polymodal.families.gemini.presets import PRESETS as GEMINI_PRESETS
from polymodal.families.kosmos.config import KosmosConfig
from polymodal.families.kosmos.format import KosmosFormat
from polymodal.families.kosmos.model import Kosmos
from polymodal.families.kosmos.presets import PRESETS as KOSMOS_PRESETS
from polymodal.families.paligemma.config import PaliGemmaConfig
from polymodal.families.paligemma.convert import PALIGEMMA
from polymodal.families.paligemma.format import PaliGemmaFormat
from polymodal.families.paligemma.model import PaliGemma
from polymodal.families.paligemma.presets import PRESETS as PALIGEMMA_PRESETS
from polymodal.families.spec import FamilySpec
from polymodal.models.contrastive import ContrastiveConfig, DualEncoder
from polymodal.models.flamingo import Flamingo, FlamingoConfig
from polymodal.nn.transformer import Decoder

FAMILIES: dict[str, FamilySpec] = {
    "decoder": FamilySpec(DecoderConfig, Decoder, DecoderFormat),
    "paligemma": FamilySpec(PaliGemmaConfig, PaliGemma, PaliGemmaFormat, per_token_inputs=PaliGemma.per_token,
                            placeholders=lambda c: (c.image_token_id,), needs_image=True,
                            presets=PALIGEMMA_PRESETS, hf={"paligemma": PALIGEMMA}),
    "flamingo": FamilySpec(FlamingoConfig, Flamingo, InterleavedFormat, InterleavedCollator,
                           per_token_inputs=("media_locations", "image_attention_mask")),
    "kosmos": FamilySpec(KosmosConfig, Kosmos, KosmosFormat, placeholders=lambda c: (c.placeholder_token_id,),
                         presets=KOSMOS_PRESETS),
    "gemini": FamilySpec(GeminiConfig, Gemini, GeminiFormat, placeholders=lambda c: (c.tokens.placeholder,),
                         presets=GEMINI_PRESETS, hf={"fuyu": FUYU}),
    "chameleon": FamilySpec(ChameleonConfig, Chameleon, ChameleonFormat, presets=CHAMELEON_PRESETS,
                            hf={"chameleon": CHAMELEON}),
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
