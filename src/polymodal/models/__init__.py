"""The model families: each maps its config class to its model class here.

`build(config)` builds any registered family from its config; `CONFIG_CLASSES` lets `load_config`
read back any polymodal config.json.
"""

from pathlib import Path

from polymodal.config import Config, ConfigError, DecoderConfig, read_json_config
from polymodal.encoders.audio import AudioConfig, AudioEncoder
from polymodal.encoders.vq import VQConfig, VQModel
from polymodal.encoders.vit import ViT, VisionConfig
from polymodal.families.chameleon.config import ChameleonConfig
from polymodal.families.chameleon.model import Chameleon
from polymodal.families.gemini.config import GeminiConfig
from polymodal.families.gemini.model import Gemini
from polymodal.families.kosmos.config import KosmosConfig
from polymodal.families.kosmos.model import Kosmos
from polymodal.families.paligemma.config import PaliGemmaConfig
from polymodal.families.paligemma.model import PaliGemma
from polymodal.models.contrastive import ContrastiveConfig, DualEncoder
from polymodal.models.flamingo import Flamingo, FlamingoConfig
from polymodal.nn.transformer import Decoder

MODEL_CLASSES: dict[type, type] = {
    DecoderConfig: Decoder,
    VisionConfig: ViT,
    PaliGemmaConfig: PaliGemma,
    FlamingoConfig: Flamingo,
    KosmosConfig: Kosmos,
    AudioConfig: AudioEncoder,
    GeminiConfig: Gemini,
    ContrastiveConfig: DualEncoder,
    VQConfig: VQModel,
    ChameleonConfig: Chameleon,
}

CONFIG_CLASSES: dict[str, type] = {cls.__name__: cls for cls in MODEL_CLASSES}


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
