"""Hugging Face checkpoint directories <-> polymodal models, one key map per HF model_type.

`FAMILIES` is every family's `hf` key maps (`families.FAMILIES`) under the HF `model_type` each reads;
the maps are made of `rules.py`'s pieces.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from polymodal.config import ConfigError, read_json_config
from polymodal.convert.load import load_model, resolve_dtype
from polymodal.convert.rules import Family, export_state
from polymodal.errors import CheckpointError, InputError, MissingFileError
from polymodal.families import merged
from polymodal.nn.quantize import check_not_quantized
from polymodal.serialization import atomic_directory
from polymodal.weights import Weights, shard_size, write_weights

FAMILIES: dict[str, Family] = merged("hf")


def read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise MissingFileError(f"no config.json in {directory}")
    return read_json_config(path)


def family_of(hf: dict, directory: Path) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"{directory}: model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def load_hf(directory: str | Path, *, dtype: torch.dtype | str | None = None,
            device: torch.device | str | None = None, quantize: str | None = None) -> nn.Module:
    """Build a polymodal model from an HF checkpoint directory (config.json + safetensors, sharded or not),
    one tensor at a time (`convert.load`): dtype None is float32, "auto" the checkpoint's own."""
    directory = Path(directory)
    hf = read_hf_config(directory)
    family = family_of(hf, directory)
    try:  # a size given as a string, a missing field, a section that is null: one line naming the file
        cfg = family.config_from_hf(hf)
    except ConfigError as e:
        raise ConfigError(f"{directory / 'config.json'}: {e}") from e
    except KeyError as e:
        raise ConfigError(f"{directory / 'config.json'} has no {e.args[0]!r}, which a {hf['model_type']} config "
                          "needs") from e
    except (TypeError, AttributeError, ValueError) as e:
        raise ConfigError(f"{directory / 'config.json'}: a field has the wrong type for a {hf['model_type']} config "
                          f"({type(e).__name__}: {e})") from e
    if family.from_directory is not None:
        cfg = family.from_directory(cfg, directory)
    weights = Weights(directory)
    dtype = resolve_dtype(dtype, weights, hf.get("dtype") or hf.get("torch_dtype"))  # "auto": the config's first
    names = {family.canonical(k): k for k in weights.keys()}
    names = {k: v for k, v in names.items() if not k.startswith(family.skip)}
    tied = family.tied_head(cfg) if family.tied_head is not None else None
    if tied is not None and tied[0] in names:  # a tied head saved anyway: the same tensor, or an error
        head, embeddings = tied
        if embeddings in names:
            saved = weights.read(names[head])
            if not torch.equal(saved, weights.read(names[embeddings])):
                raise CheckpointError(f"{directory}: config.json ties the output head to the input embeddings "
                                      f"(tie_word_embeddings), but the checkpoint's {head} differs from {embeddings}; "
                                      "set tie_word_embeddings to false in config.json to load both")
            weights.release(saved)
        del names[head]
    rules = family.rules(cfg)
    used = {k for r in rules for k in r.theirs}
    extra = sorted(k for k in names if k not in used and not any(k.endswith(s) for s in family.ignore))
    if extra:
        raise CheckpointError(f"checkpoint {directory} has tensors the config does not explain: {extra[:10]}")
    return load_model(family.build, cfg, weights, rules, names, dtype=dtype, device=device, quantize=quantize)


def save_hf(model: nn.Module, directory: str | Path, model_type: str, files: dict[str, bytes] | None = None,
            max_shard_size: int | str = "50GB") -> None:
    """Write a polymodal model as an HF checkpoint directory of the given model_type (atomic), tensor by tensor
    from the model's own memory (fused tensors split as views), in HF's shards above `max_shard_size`, with
    `files` (name -> bytes: tokenizer, processor configs, model card; `hf_export.export_hf`) in the same swap."""
    if model_type not in FAMILIES:
        raise InputError(f"cannot export to model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    cfg = model.config
    shard_size(max_shard_size)
    check_not_quantized(model)
    try:  # a model of another family has other config fields and weights than this key map reads
        hf_config, hf_state = family.config_to_hf(cfg), export_state(family.rules(cfg), model.state_dict())
    except (AttributeError, KeyError) as e:
        raise InputError(f"a {type(cfg).__name__} model cannot be written as model_type {model_type!r} "
                         f"({type(e).__name__}: {e})") from e
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        write_weights(tmp, hf_state, {"format": "pt"}, max_shard_size)
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
