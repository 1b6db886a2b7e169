"""The public entry points: build, from_pretrained, save_pretrained."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from polymodal.config import Config, check_fits_memory, read_json_config
from polymodal.convert.hf import load_hf
from polymodal.convert.load import load_polymodal, load_sharded_model
from polymodal.convert.mask_vae_file import found_mask_vae
from polymodal.convert.peft import ADAPTER_CONFIG, load_adapter, merge_lora, read_adapter_config
from polymodal.errors import InputError, InputTypeError, MissingFileError
from polymodal.families import MODEL_CLASSES, load_config
from polymodal.nn.quantize import check_not_quantized
from polymodal.nn.quantize import quantize as quantize_model
from polymodal.presets import get_preset
from polymodal.runs import resolve
from polymodal.serialization import atomic_directory
from polymodal.weights import SHARDED, WEIGHTS, shard_size, write_weights


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


def save_pretrained(model: nn.Module, directory: str | Path, *, max_shard_size: int | str = "50GB") -> None:
    """config.json + model.safetensors, written atomically and tensor by tensor from the model's memory; above
    `max_shard_size` (bytes, or HF's strings such as "5GB") HF's shards + model.safetensors.index.json."""
    shard_size(max_shard_size)  # a bad size or a quantized model is refused before the directory is touched
    check_not_quantized(model)
    with atomic_directory(directory) as tmp:
        model.config.to_json(tmp / "config.json")
        write_weights(tmp, model.state_dict(), {"format": "pt", "producer": "polymodal"}, max_shard_size)


def from_pretrained(directory: str | Path, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, quantize: str | None = None) -> nn.Module:
    """Load a polymodal directory (save_pretrained) or a Hugging Face checkpoint directory (one
    model.safetensors or HF's shards), at the cost of the weights: the model is built on the meta device
    and each tensor read from the memory-mapped files, cast and put on `device` one at a time (no float32
    copy of the model on the way), each checked as it is read (float, every value finite).

    The model is float32 unless `dtype` is given: dtype="auto" keeps the checkpoint's dtype (the one its HF
    config.json names, as HF's from_pretrained; bfloat16 for float8 weights), dtype=torch.bfloat16 casts to it
    (a stored value past its range is an error, not inf); RoPE frequencies stay float32 either way.

    A training checkpoint that FSDP processes wrote sharded (`train.checkpoint.save_sharded`) is put together
    here in one process. A LoRA adapter directory (adapter_config.json, as `save_adapter` or peft write it)
    loads its base model (`base_model_name_or_path`) with the adapter on top. quantize="int8" | "int4": weight-only quantized
    decoder linear layers (`nn.quantize`), each quantized as it is loaded (an adapter is merged first).

    A `polymodal train` run directory loads its best checkpoint (its last when it kept no best one).
    A `vae-oid.npz` beside the weights (an HF export's or a LoRA run's mask VQ-VAE) is joined to the model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingFileError(f"{directory} is not a directory")
    if (directory / "checkpoints").is_dir() and not (directory / "config.json").is_file():
        directory = resolve(directory)[0]
    return found_mask_vae(_load(directory, dtype=dtype, device=device, quantize=quantize), directory)


def _load(directory: Path, *, dtype, device, quantize) -> nn.Module:
    if quantize is not None and quantize not in ("int8", "int4"):
        raise InputError(f"quantize must be 'int8' or 'int4' (or None), got {quantize!r}")
    if (directory / ADAPTER_CONFIG).is_file() and not (directory / WEIGHTS).is_file():
        return _from_adapter(directory, dtype=dtype, device=device, quantize=quantize)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise MissingFileError(f"no config.json in {directory}")
    options = {"dtype": dtype, "device": device, "quantize": quantize}
    if "config_class" in read_json_config(config_path):
        if (directory / SHARDED).is_dir():  # a training checkpoint that FSDP processes wrote sharded
            return load_sharded_model(build, load_config(config_path), directory, **options)
        return load_polymodal(build, load_config(config_path), directory, **options)
    return load_hf(directory, **options)


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
