"""polymodal: multimodal language models (Flamingo, KOSMOS-1, PaliGemma, Gemini-style) from one set of
PyTorch blocks, matching their reference implementations."""

from polymodal.api import build, from_pretrained, save_pretrained
from polymodal.config import ConfigError, DecoderConfig
from polymodal.convert.peft import add_lora, load_adapter, merge_lora, save_adapter
from polymodal.data.locations import parse_locations
from polymodal.generation.consensus import select_threshold, uncertainty_routed
from polymodal.errors import (CheckpointError, DocumentError, ExistingFileError, InputError, InputTypeError,
                              MissingFileError, PathKindError, PolymodalError, UnknownNameError)
from polymodal.generation.engine import generate
from polymodal.nn.quantize import quantize
from polymodal.presets import PRESETS

__all__ = ["build", "from_pretrained", "save_pretrained", "generate", "uncertainty_routed", "select_threshold",
           "DecoderConfig", "ConfigError", "PRESETS", "add_lora", "save_adapter", "load_adapter", "merge_lora",
           "quantize", "PolymodalError", "InputError", "InputTypeError", "DocumentError", "CheckpointError",
           "MissingFileError", "ExistingFileError", "PathKindError", "UnknownNameError", "parse_locations"]
__version__ = "0.1.0"
