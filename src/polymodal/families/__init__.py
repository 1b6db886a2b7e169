"""Every family, one entry each, in one literal dict (no registration by import side effects), and the registries
derived from it: model and config classes by config, `load_config` for any polymodal config.json, and
`merged` for the unions (`presets.PRESETS`, `convert.hf.FAMILIES`).

`spec_of(config_or_model)` is how shared machinery finds a family's spec.
"""

from __future__ import annotations

from pathlib import Path

from polymodal.config import Config, ConfigError, DecoderConfig, read_json_config
from polymodal.convert import hf_vision
from polymodal.convert.hf_gemma3n_audio import GEMMA3N_AUDIO_TOWER
from polymodal.convert.hf_whisper import WHISPER
from polymodal.encoders.audio import AudioConfig, AudioEncoder
from polymodal.encoders.conformer import ConformerConfig, ConformerEncoder
from polymodal.encoders.vit import ViT, VisionConfig
from polymodal.encoders.vq import VQConfig, VQModel
from polymodal.families.chameleon.config import ChameleonConfig
from polymodal.families.chameleon.convert import CHAMELEON
from polymodal.families.chameleon.format import ChameleonFormat
from polymodal.families.chameleon.model import Chameleon
from polymodal.families.chameleon.presets import PRESETS as CHAMELEON_PRESETS
from polymodal.families.contrastive.config import ContrastiveConfig
from polymodal.families.contrastive.convert import CLIP, SIGLIP
from polymodal.families.contrastive.format import PairCollator, PairFormat
from polymodal.families.contrastive.model import DualEncoder
from polymodal.families.contrastive.presets import PRESETS as CONTRASTIVE_PRESETS
from polymodal.families.decoder.convert import COHERE, GEMMA, LLAMA
from polymodal.families.decoder.format import DecoderFormat
from polymodal.families.decoder.presets import PRESETS as DECODER_PRESETS
from polymodal.families.flamingo.config import FlamingoConfig
from polymodal.families.flamingo.convert import IDEFICS
from polymodal.families.flamingo.format import InterleavedCollator, InterleavedFormat
from polymodal.families.flamingo.model import Flamingo
from polymodal.families.flamingo.presets import PRESETS as FLAMINGO_PRESETS
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
from polymodal.nn.transformer import Decoder

FAMILIES: dict[str, FamilySpec] = {
    "decoder": FamilySpec(DecoderConfig, Decoder, DecoderFormat, presets=DECODER_PRESETS,
                          hf={"llama": LLAMA, "gemma": GEMMA, "cohere": COHERE}, peft=("llama", ())),
    "paligemma": FamilySpec(PaliGemmaConfig, PaliGemma, PaliGemmaFormat, per_token_inputs=PaliGemma.per_token,
                            placeholders=lambda c: (c.image_token_id,), needs_image=True, single_turn=True,
                            locations=True,
                            presets=PALIGEMMA_PRESETS,
                            hf={"paligemma": PALIGEMMA},
                            peft=("paligemma", (("language_model.model.", "model.language_model."),
                                                ("language_model.lm_head", "lm_head"),
                                                ("vision_tower.", "model.vision_tower."),
                                                ("multi_modal_projector.", "model.multi_modal_projector.")))),
    "flamingo": FamilySpec(FlamingoConfig, Flamingo, InterleavedFormat, InterleavedCollator,
                           per_token_inputs=("media_locations", "image_attention_mask"),
                           presets=FLAMINGO_PRESETS, hf={"idefics": IDEFICS}),
    "kosmos": FamilySpec(KosmosConfig, Kosmos, KosmosFormat, placeholders=lambda c: (c.placeholder_token_id,),
                         presets=KOSMOS_PRESETS),
    "gemini": FamilySpec(GeminiConfig, Gemini, GeminiFormat, placeholders=lambda c: (c.tokens.placeholder,),
                         presets=GEMINI_PRESETS, hf={"fuyu": FUYU}),
    "chameleon": FamilySpec(ChameleonConfig, Chameleon, ChameleonFormat, presets=CHAMELEON_PRESETS,
                            hf={"chameleon": CHAMELEON}),
    "contrastive": FamilySpec(ContrastiveConfig, DualEncoder, PairFormat, PairCollator, pairs=True,
                              presets=CONTRASTIVE_PRESETS, hf={"clip": CLIP, "siglip": SIGLIP}),
    "vit": FamilySpec(VisionConfig, ViT, hf={"siglip_vision_model": hf_vision.SIGLIP_VISION,
                                             "clip_vision_model": hf_vision.CLIP_VISION}),
    "audio": FamilySpec(AudioConfig, AudioEncoder, hf={"whisper": WHISPER}),
    "conformer": FamilySpec(ConformerConfig, ConformerEncoder, hf={"gemma3n_audio": GEMMA3N_AUDIO_TOWER}),
    "vq": FamilySpec(VQConfig, VQModel),
}

MODEL_CLASSES: dict[type, type] = {spec.config: spec.model for spec in FAMILIES.values()}
CONFIG_CLASSES: dict[str, type] = {spec.config.__name__: spec.config for spec in FAMILIES.values()}
_BY_CONFIG = {spec.config: spec for spec in FAMILIES.values()}


def spec_of(config_or_model) -> FamilySpec:
    """The spec of a config, or of a model built from one (read from its `.config`)."""
    config = config_or_model if isinstance(config_or_model, Config) else getattr(config_or_model, "config", None)
    if type(config) not in _BY_CONFIG:
        raise ConfigError(f"{type(config_or_model).__name__} is no polymodal family; known configs: "
                          f"{sorted(c.__name__ for c in _BY_CONFIG)}")
    return _BY_CONFIG[type(config)]


def merged(field: str) -> dict:
    """The union of one dict field (`presets`, `hf`) over every family's spec; ConfigError naming a key two
    families both claim."""
    out: dict = {}
    for family, spec in FAMILIES.items():
        for name, value in getattr(spec, field).items():
            if name in out:
                raise ConfigError(f"{field} {name!r} is claimed by two families ({out[name][0]} and {family})")
            out[name] = (family, value)
    return {name: value for name, (_, value) in out.items()}


def load_config(path: str | Path) -> Config:
    """Read a polymodal config.json written by `Config.to_json`; ConfigError naming the file if it is not one."""
    data = read_json_config(path)
    name = data.pop("config_class", None)
    if name not in CONFIG_CLASSES:
        raise ConfigError(f"{path}: config_class must be one of {sorted(CONFIG_CLASSES)}, got {name!r}")
    try:
        return CONFIG_CLASSES[name].from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
