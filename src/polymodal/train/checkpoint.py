"""Training checkpoints with no pickle anywhere: safetensors for tensors, JSON for the rest.

A checkpoint is a directory `step-000123/` holding
  config.json + model.safetensors   the model, loadable on its own with `polymodal.from_pretrained`
  (a LoRA run: adapter_config.json + adapter_model.safetensors instead, in peft's layout, naming the base)
  tokenizer files                   when the run has a tokenizer, so generate/eval need nothing else
  optimizer.safetensors             optimizer state tensors, keyed `<param name>/<state name>`
  trainer.json                      optimizer hyper-parameters, step, data position, RNG states
It is written into a hidden temporary sibling and renamed into place (`atomic_directory`), so a
visible `step-*` directory is always complete; a crash leaves at most a hidden `.step-*.tmp-*`,
which `prune` removes. `prune` never removes the run's best checkpoint (best.json, `polymodal.runs`).
Checkpoints are ordered by their step number, not by name. A checkpoint damaged later (a full disk, a
truncated copy, a lost shard) is a `CheckpointError` naming the file, and `load_latest` falls back to the
newest intact one, sharded or not.

A run of several FSDP2 processes writes its checkpoints sharded instead (`save_sharded`, no gather onto
one process): `sharded/` holds each process's shards of the model and optimizer tensors, written by
`torch.distributed.checkpoint` in its safetensors layout (`HuggingFaceStorageWriter`: each file's header
says where its pieces lie in the whole tensors; no pickle), beside the same config.json, trainer.json and
tokenizer. `load_sharded` reads it into any number of processes, one included (DCP reshards), and
`pm.from_pretrained` reads its model (`polymodal convert CKPT DIR --to polymodal` writes a plain
directory). Full checkpoints, written by one process, are read whole by every process of a resumed run.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from polymodal.api import build
from polymodal.config import ConfigError
from polymodal.convert.peft import ADAPTER_WEIGHTS
from polymodal.errors import CheckpointError
from polymodal.families import load_config
from polymodal.nn.meta import empty
from polymodal.runs import BEST, PREFIX, latest_checkpoint, list_checkpoints, read_best, step_dir  # noqa: F401
from polymodal.serialization import WEIGHTS, atomic_directory, atomic_write_bytes, read_safetensors, save_state_dict
from polymodal.weights import SHARDED, SHARDED_MODEL, check_weight, open_checked

OPTIMIZER = "optimizer.safetensors"
TRAINER = "trainer.json"


def prune(root: str | Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints and the best one (best.json); remove older ones and leftovers of
    interrupted saves."""
    root = Path(root)
    best = read_best(root)
    kept = {step_dir(root, best["step"])} if best is not None else set()
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        if old not in kept:
            shutil.rmtree(old)
    for tmp in root.glob(f".{PREFIX}*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def write_best(root: str | Path, step: int, metric: str, value: float) -> None:
    """Name checkpoint `step` (already written) the run's best by `metric`, atomically."""
    record = {"step": step, "metric": metric, "value": value}
    atomic_write_bytes(Path(root) / BEST, (json.dumps(record) + "\n").encode())


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
                    write_extra: Callable[[Path], None] | None = None) -> None:
    """Write one complete checkpoint directory atomically (replacing an older one of that name), with the files
    `write_extra(directory)` puts beside the weights (a mask VQ-VAE's). A LoRA run writes its adapter there
    instead of the frozen model_state."""
    tensors, meta = _flatten_optimizer(optimizer_state)
    with atomic_directory(directory) as tmp:
        model_config.to_json(tmp / "config.json")
        if model_state is not None:
            save_state_dict(model_state, tmp / WEIGHTS, metadata={"format": "pt", "producer": "polymodal"})
        if write_extra is not None:
            write_extra(tmp)
        save_state_dict(tensors, tmp / OPTIMIZER)
        (tmp / TRAINER).write_text(json.dumps({**trainer_state, "optimizer": meta}) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)


def read_trainer_state(directory: Path) -> dict[str, Any]:
    path = directory / TRAINER
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): it may be truncated or corrupt") from e
    if not isinstance(state, dict) or not {"step", "optimizer"} <= set(state):
        raise CheckpointError(f"{path} is not a trainer state (expected an object with 'step' and 'optimizer')")
    return state


def _sharded_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's model and optimizer tensors (DTensor shards under FSDP2) under one flat namespace, and
    the optimizer's JSON part."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    # the model's first: it reshards an FSDP2 root that a forward without backward (an eval) left unsharded,
    # whose parameters the optimizer's would otherwise not be
    model_state = get_model_state_dict(model)
    tensors, meta = _flatten_optimizer(get_optimizer_state_dict(model, optimizer))
    return ({**{f"{SHARDED_MODEL}{k}": v for k, v in model_state.items()},
             **{f"optimizer/{k}": v for k, v in tensors.items()}}, meta)


def save_sharded(directory: str | Path, model_config, model, optimizer, trainer_state: dict[str, Any], tokenizer,
                 main: bool, write_extra: Callable[[Path], None] | None = None) -> None:
    """Every process writes its own shards (collective: all processes call it) into one temporary folder that
    the main process then renames into place, with `write_extra`'s files, as `save_checkpoint` does."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    tensors, meta = _sharded_state(model, optimizer)
    with contextlib.ExitStack() as stack:
        where = [str(stack.enter_context(atomic_directory(directory))) if main else None]
        dist.broadcast_object_list(where, src=0)
        tmp = Path(where[0])
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDED), save_distributed=True))
        if main:
            model_config.to_json(tmp / "config.json")
            (tmp / TRAINER).write_text(json.dumps({**trainer_state, "optimizer": meta}) + "\n")
            if tokenizer is not None:
                tokenizer.save(tmp)
            if write_extra is not None:
                write_extra(tmp)
        dist.barrier()  # every shard is written before the folder is swapped into place


def load_sharded(directory: Path, model, optimizer, optimizer_meta: dict[str, Any]) -> None:
    """A sharded checkpoint's model and optimizer state, into this run's (sharded or whole) model and
    optimizer, whatever number of processes wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    tensors, _ = _sharded_state(model, optimizer)
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(directory / SHARDED)),
             no_dist=not torch.distributed.is_initialized())
    set_model_state_dict(model, {k.removeprefix(SHARDED_MODEL): v for k, v in tensors.items()
                                 if k.startswith(SHARDED_MODEL)})
    optimizer_tensors = {k.removeprefix("optimizer/"): v for k, v in tensors.items() if k.startswith("optimizer/")}
    set_optimizer_state_dict(model, optimizer, _unflatten_optimizer(optimizer_tensors, optimizer_meta))


def is_sharded(directory: str | Path) -> bool:
    return (Path(directory) / SHARDED).is_dir()


def _check_shards(folder: Path, config) -> None:
    """Every file of a sharded checkpoint has a readable header that its size matches, and together they hold
    every tensor of the model that `config` builds entire (and its optimizer state), so a truncated, corrupt or
    lost shard is a CheckpointError naming it, as a plain checkpoint's file is. Headers only: no tensor is read."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no shard files: not a complete training checkpoint")
    for path in files:
        open_checked(path)
    found = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    shapes = {k: v.shape for k, v in empty(lambda: build(config)).state_dict().items()}
    missing = sorted(k for k in shapes if f"{SHARDED_MODEL}{k}" not in found)
    if missing:
        raise CheckpointError(f"{folder}: its {len(files)} shard files lack {len(missing)} of the model's tensors "
                              f"({missing[:3]}): a process's shard file is missing")
    for key, entry in found.items():
        name = key.removeprefix(SHARDED_MODEL)
        if key.startswith("optimizer/"):  # optimizer/<parameter>/<state>: the parameter's shape
            name = key.removeprefix("optimizer/").rsplit("/", 1)[0]
        whole = shapes.get(name, entry.size)
        whole = whole if len(whole) == len(entry.size) else entry.size  # an optimizer's step count: a scalar
        held = sum(math.prod(chunk.sizes) for chunk in entry.chunks)
        if held != math.prod(whole):
            raise CheckpointError(f"{folder}: its {len(files)} shard files hold {held:,} of the {math.prod(whole):,} "
                                  f"values of {key}: a process's shard file is missing")


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state, trainer state) of a checkpoint, read without unpickling; its config.json
    is read too. The model state is None in a LoRA run's checkpoint (its adapter files hold what it trained).
    A sharded checkpoint gives (None, the optimizer's JSON part, trainer state): `load_sharded` reads its
    tensors into the model. CheckpointError naming the file when one is missing, truncated or corrupt."""
    directory = Path(directory)
    adapter, sharded = (directory / ADAPTER_WEIGHTS).is_file(), is_sharded(directory)
    weights = () if sharded else (ADAPTER_WEIGHTS if adapter else WEIGHTS, OPTIMIZER)
    for name in ("config.json", *weights, TRAINER):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} has no {name}: not a complete training checkpoint")
    try:
        config = load_config(directory / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    trainer_state = read_trainer_state(directory)
    if sharded:
        _check_shards(directory / SHARDED, config)
        return None, trainer_state.pop("optimizer"), trainer_state
    optimizer_state = _unflatten_optimizer(_finite(directory / OPTIMIZER), trainer_state.pop("optimizer"))
    if adapter:
        _finite(directory / ADAPTER_WEIGHTS)  # read whole now, so a damaged one falls back like weights
        return None, optimizer_state, trainer_state
    return _finite(directory / WEIGHTS), optimizer_state, trainer_state


def _finite(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors, each float one checked finite (`check_weight`): a NaN in a damaged file would
    make the resumed run's first loss NaN rather than fall back to the checkpoint before it."""
    tensors = read_safetensors(path)
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            check_weight(tensor, name, path)
    return tensors


def load_latest(root: str | Path, say: Callable[[str], None]) -> tuple[Path, tuple] | None:
    """The newest checkpoint under root that reads whole, with `load_checkpoint`'s result; each damaged newer
    one is named through `say`, and left in place. None if there is no checkpoint at all."""
    found = list_checkpoints(root)
    for directory in reversed(found):
        try:
            return directory, load_checkpoint(directory)
        except CheckpointError as e:
            say(f"cannot resume from {directory.name}: {e}; falling back to the checkpoint before it")
    if found:
        raise CheckpointError(f"no intact checkpoint in {root}: all {len(found)} are damaged (see above)")
    return None
