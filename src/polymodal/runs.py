"""A training run's directory: where its checkpoints are and which one a command should load.

    runs/<name>/checkpoints/step-000600/   complete checkpoints (train/checkpoint.py writes them)
    runs/<name>/checkpoints/best.json      {"step", "metric", "value"}: the checkpoint kept as the best by
                                           the run's --keep-best metric (train/trainer.py writes it)

`resolve` is the one place that turns a path a user gives (a model directory, or a run directory) into the
directory to load: a run's best checkpoint when it has one, else its last; `polymodal eval/generate/serve/
convert` and `polymodal.from_pretrained` all go through it.
"""

from __future__ import annotations

import json
from pathlib import Path

from polymodal.errors import MissingFileError

PREFIX = "step-"
BEST = "best.json"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_best(root: str | Path) -> dict | None:
    """best.json of a checkpoints folder when it names a checkpoint that is there; None otherwise (a run with
    no --keep-best metric, or one killed between writing the checkpoint and this record)."""
    path = Path(root) / BEST
    try:
        best = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(best, dict) or not isinstance(best.get("step"), int):
        return None
    return best if step_dir(root, best["step"]).is_dir() else None


def resolve(path: str | Path) -> tuple[Path, str]:
    """(directory to load, a line saying which) for a model directory, or a run directory: its best checkpoint
    when it has one, else its last. MissingFileError (a FileNotFoundError) when the path is neither."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p, f"using {p}"
    root = p / "checkpoints"
    best = read_best(root)
    if best is not None:
        chosen = step_dir(root, best["step"])
        return chosen, f"using {chosen}: the best checkpoint by {best['metric']} ({best['value']:.4g})"
    last = latest_checkpoint(root)
    if last is None:
        raise MissingFileError(f"{p} is neither a model directory (no config.json) nor a run directory with "
                               "checkpoints; train one with `polymodal train`")
    return last, f"using {last}: the last checkpoint (the run kept no best one)"
