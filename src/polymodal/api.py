"""The public entry points: build, from_pretrained, save_pretrained."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from polymodal.config import Config, check_fits_memory, load_config, read_json_config
from polymodal.convert.hf import load_hf
from polymodal.models import MODEL_CLASSES
from polymodal.presets import get_preset
from polymodal.serialization import WEIGHTS, atomic_directory, load_into, load_weights, save_state_dict


def build(config: Config | str, *, backend: str = "sdpa") -> nn.Module:
    """A model with fresh weights from a config object or a preset name. backend: its decoder's attention
    kernel, "sdpa", "eager" (the reference) or "flex" (FlexAttention block masks; trains on CUDA only)."""
    if isinstance(config, str):
        config = get_preset(config)
    if type(config) not in MODEL_CLASSES:
        raise TypeError(f"no model family for {type(config).__name__}; known: {[c.__name__ for c in MODEL_CLASSES]}")
    cls = MODEL_CLASSES[type(config)]
    check_fits_memory(config)
    if backend == "sdpa":
        return cls(config)
    if "backend" not in inspect.signature(cls).parameters:
        raise ValueError(f"{cls.__name__} has no decoder whose attention backend can be chosen: backend must be "
                         f"'sdpa', got {backend!r}")
    return cls(config, backend=backend)


def save_pretrained(model: nn.Module, directory: str | Path) -> None:
    """config.json + model.safetensors, written atomically."""
    with atomic_directory(directory) as tmp:
        model.config.to_json(tmp / "config.json")
        save_state_dict(model.state_dict(), tmp / WEIGHTS, metadata={"format": "pt", "producer": "polymodal"})


def from_pretrained(directory: str | Path, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """Load a polymodal directory (save_pretrained) or a Hugging Face checkpoint directory.

    The model is float32 unless `dtype` is given, whatever dtype the checkpoint stores (HF's from_pretrained
    keeps a bfloat16 checkpoint bfloat16): bfloat16 / float16 weights are widened exactly. Pass
    dtype=torch.bfloat16 for HF's memory footprint; RoPE frequencies stay float32 either way."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"no config.json in {directory}")
    if "config_class" in read_json_config(config_path):
        model = build(load_config(config_path))
        load_into(model, load_weights(directory), directory)
    else:
        model = load_hf(directory)
    model.eval()
    return model.to(device=device, dtype=dtype) if (device or dtype) else model
