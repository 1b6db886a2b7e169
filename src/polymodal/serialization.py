"""Safe, atomic model files: safetensors weights + config.json, never pickles.

A save writes everything into a temporary sibling directory, fsyncs it, then swaps it into place,
so an interrupted save leaves the previous files intact (or the new ones complete), never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | Path):
    """Yields a temporary directory; on success it replaces `target` whole. A target that is a file, or a
    directory holding anything but a checkpoint (no config.json), is refused first: it is a user's."""
    target = Path(target)
    if target.exists() and not (target.is_dir() and ((target / "config.json").is_file() or not any(target.iterdir()))):
        raise FileExistsError(f"{target} exists and is not a checkpoint directory (a file, or a folder without "
                              "config.json): refusing to replace it; give a new or empty directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a single file atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata=metadata)


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: one model.safetensors, or shards listed in an index."""
    directory = Path(directory)
    if (directory / INDEX).exists():
        index = json.loads((directory / INDEX).read_text())
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            if not (directory / shard).exists():
                raise FileNotFoundError(f"{directory / INDEX} lists shard {shard}, which is missing")
            state.update(load_file(str(directory / shard)))
        return state
    if (directory / WEIGHTS).exists():
        return load_file(str(directory / WEIGHTS))
    singles = sorted(directory.glob("*.safetensors"))
    if len(singles) == 1:
        return load_file(str(singles[0]))
    pickles = [n for n in PICKLE_NAMES if (directory / n).exists()]
    if pickles:
        raise ValueError(f"{directory} holds only pickle weights ({', '.join(pickles)}); polymodal loads weights "
                         "only from safetensors, since unpickling a file can run arbitrary code. Convert them "
                         "with a tool you trust (e.g. transformers' save_pretrained(safe_serialization=True)).")
    raise FileNotFoundError(f"no {WEIGHTS} or {INDEX} in {directory}")


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Strict load that names every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state[k].shape)}"
              for k in expected if k in state and expected[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = [f"checkpoint {source} does not fit the model config"]
        if missing:
            parts.append(f"missing {len(missing)} tensors: {missing[:10]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors: {unexpected[:10]}")
        if shapes:
            parts.append(f"wrong shapes: {shapes[:10]}")
        raise ValueError("; ".join(parts))
    model.load_state_dict(state, strict=True)
