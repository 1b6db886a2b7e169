"""Training checkpoints with no pickle anywhere: safetensors for tensors, JSON for the rest.

A checkpoint is a directory `step-000123/` holding
  config.json + model.safetensors   the model, loadable on its own with `polymodal.from_pretrained`
  (a LoRA run: adapter_config.json + adapter_model.safetensors instead, in peft's layout, naming the base)
  tokenizer files                   when the run has a tokenizer, so generate/eval need nothing else
  optimizer.safetensors             optimizer state tensors, keyed `<param name>/<state name>`
  trainer.json                      optimizer hyper-parameters, step, data position, RNG states
It is written into a hidden temporary sibling and renamed into place (`atomic_directory`), so a
visible `step-*` directory is always complete; a crash leaves at most a hidden `.step-*.tmp-*`,
which `prune` removes. State dicts here are full (unsharded) tensors on the CPU; the trainer
gathers and scatters them for FSDP/DDP.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from polymodal.convert.peft import ADAPTER_WEIGHTS
from polymodal.serialization import WEIGHTS, atomic_directory, save_state_dict

OPTIMIZER = "optimizer.safetensors"
TRAINER = "trainer.json"
PREFIX = "step-"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[5:].isdigit())


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: str | Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove older ones and leftovers of interrupted saves."""
    root = Path(root)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    for tmp in root.glob(f".{PREFIX}*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as JSON-able values (torch's as lists of bytes)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(keys), gauss],
             "numpy": [name, np_keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict (keyed by parameter names) into tensors and JSON."""
    tensors, scalars = {}, {}
    for name, entries in osd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value
            else:
                scalars[f"{name}/{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(directory: str | Path, model_config, model_state: dict[str, torch.Tensor] | None,
                    optimizer_state: dict[str, Any], trainer_state: dict[str, Any], tokenizer=None,
                    write_adapter: Callable[[Path], None] | None = None) -> None:
    """Write one complete checkpoint directory atomically (replacing an older one of that name).
    A LoRA run writes its adapter (write_adapter(directory)) instead of the frozen model_state."""
    tensors, meta = _flatten_optimizer(optimizer_state)
    with atomic_directory(directory) as tmp:
        model_config.to_json(tmp / "config.json")
        if model_state is not None:
            save_state_dict(model_state, tmp / WEIGHTS, metadata={"format": "pt", "producer": "polymodal"})
        if write_adapter is not None:
            write_adapter(tmp)
        save_state_dict(tensors, tmp / OPTIMIZER)
        (tmp / TRAINER).write_text(json.dumps({**trainer_state, "optimizer": meta}) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state, trainer state) of a checkpoint, read without unpickling; the model
    state is None in a LoRA run's checkpoint (its adapter files hold what it trained)."""
    directory = Path(directory)
    adapter = (directory / ADAPTER_WEIGHTS).is_file()
    for name in (ADAPTER_WEIGHTS if adapter else WEIGHTS, OPTIMIZER, TRAINER):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no {name}: not a training checkpoint")
    trainer_state = json.loads((directory / TRAINER).read_text())
    optimizer_state = _unflatten_optimizer(load_file(str(directory / OPTIMIZER)), trainer_state.pop("optimizer"))
    return None if adapter else load_file(str(directory / WEIGHTS)), optimizer_state, trainer_state
