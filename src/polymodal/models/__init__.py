"""The model families: each maps its config class to its model class here.

`build(config)` builds any registered family from its config; `CONFIG_CLASSES` lets
`config.load_config` read back any polymodal config.json.
"""

from polymodal.config import DecoderConfig
from polymodal.encoders.audio import AudioConfig, AudioEncoder
from polymodal.encoders.vq import VQConfig, VQModel
from polymodal.encoders.vit import ViT, VisionConfig
from polymodal.models.chameleon import Chameleon, ChameleonConfig
from polymodal.models.contrastive import ContrastiveConfig, DualEncoder
from polymodal.models.flamingo import Flamingo, FlamingoConfig
from polymodal.models.gemini import Gemini, GeminiConfig
from polymodal.models.kosmos import Kosmos, KosmosConfig
from polymodal.models.paligemma import PaliGemma, PaliGemmaConfig
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
