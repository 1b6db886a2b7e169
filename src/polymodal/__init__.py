"""polymodal: multimodal language models (Flamingo, KOSMOS-1, PaliGemma, Gemini-style) from one set of
PyTorch blocks, matching their reference implementations."""

from polymodal.api import build, from_pretrained, save_pretrained
from polymodal.config import ConfigError, DecoderConfig
from polymodal.errors import CheckpointError, InputError, PolymodalError
from polymodal.generation.engine import generate
from polymodal.presets import PRESETS

__all__ = ["build", "from_pretrained", "save_pretrained", "generate", "DecoderConfig", "ConfigError", "PRESETS",
           "PolymodalError", "InputError", "CheckpointError"]
__version__ = "0.1.0"
