"""The public entry points: build, from_pretrained, save_pretrained."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from polymodal.config import Config, check_fits_memory, read_json_config
from polymodal.convert.hf import load_hf
from polymodal.errors import InputError, InputTypeError, MissingFileError
from polymodal.convert.peft import ADAPTER_CONFIG, load_adapter, merge_lora, read_adapter_config
from polymodal.models import MODEL_CLASSES, load_config
from polymodal.nn.quantize import quantize as quantize_model
from polymodal.presets import get_preset
from polymodal.runs import resolve
from polymodal.serialization import WEIGHTS, atomic_directory, load_into, load_weights, save_state_dict


def build(config: Config | str, *, backend: str = "sdpa") -> nn.Module:
    """A model with fresh weights from a config object or a preset name. backend: its decoder's attention
    kernel, "sdpa", "eager" (the reference) or "flex" (FlexAttention block masks; trains on CUDA only)."""
    if isinstance(config, str):
        config = get_preset(config)
    if type(config) not in MODEL_CLASSES:
        raise InputTypeError(f"no model family for {type(config).__name__}; known: {[c.__name__ for c in MODEL_CLASSES]}")
    cls = MODEL_CLASSES[type(config)]
    check_fits_memory(config)
    if backend == "sdpa":
        return cls(config)
    if "backend" not in inspect.signature(cls).parameters:
        raise InputError(f"{cls.__name__} has no decoder whose attention backend can be chosen: backend must be "
                         f"'sdpa', got {backend!r}")
    return cls(config, backend=backend)


def save_pretrained(model: nn.Module, directory: str | Path) -> None:
    """config.json + model.safetensors, written atomically."""
    with atomic_directory(directory) as tmp:
        model.config.to_json(tmp / "config.json")
        save_state_dict(model.state_dict(), tmp / WEIGHTS, metadata={"format": "pt", "producer": "polymodal"})


def from_pretrained(directory: str | Path, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, quantize: str | None = None) -> nn.Module:
    """Load a polymodal directory (save_pretrained) or a Hugging Face checkpoint directory.

    The model is float32 unless `dtype` is given, whatever dtype the checkpoint stores (HF's from_pretrained
    keeps a bfloat16 checkpoint bfloat16): bfloat16 / float16 weights are widened exactly. Pass
    dtype=torch.bfloat16 for HF's memory footprint; RoPE frequencies stay float32 either way.

    A LoRA adapter directory (adapter_config.json, as `save_adapter` or peft write it) loads its base model
    (`base_model_name_or_path`) with the adapter on top. quantize="int8" | "int4": weight-only quantized
    decoder linear layers (`nn.quantize`; an adapter is merged first).

    A `polymodal train` run directory loads its best checkpoint (its last when it kept no best one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingFileError(f"{directory} is not a directory")
    if (directory / "checkpoints").is_dir() and not (directory / "config.json").is_file():
        directory = resolve(directory)[0]
    if quantize is not None and quantize not in ("int8", "int4"):
        raise InputError(f"quantize must be 'int8' or 'int4' (or None), got {quantize!r}")
    if (directory / ADAPTER_CONFIG).is_file() and not (directory / WEIGHTS).is_file():
        return _from_adapter(directory, dtype=dtype, device=device, quantize=quantize)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise MissingFileError(f"no config.json in {directory}")
    if "config_class" in read_json_config(config_path):
        model = build(load_config(config_path))
        load_into(model, load_weights(directory), directory)
    else:
        model = load_hf(directory)
    model.eval()
    model = model.to(device=device, dtype=dtype) if (device or dtype) else model
    return quantize_model(model, quantize) if quantize else model


def _from_adapter(directory: Path, **kwargs) -> nn.Module:
    base = read_adapter_config(directory).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise MissingFileError(f"{directory} is a LoRA adapter whose base model (base_model_name_or_path) is "
                                f"{base!r}, not a directory here: load the base with from_pretrained, then "
                                "load_adapter(model, directory)")
    quantize = kwargs.pop("quantize")
    model = load_adapter(from_pretrained(base, **kwargs), directory).eval()
    if quantize:
        merge_lora(model)
    return quantize_model(model, quantize) if quantize else model
