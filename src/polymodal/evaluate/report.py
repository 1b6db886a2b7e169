"""What `polymodal eval --data` shows and keeps: a table of figures per task, and predictions.jsonl (one line per
question: id, task, prompt, prediction, references, score) with results.json (settings and figures) in one
folder, written atomically; files of an earlier evaluation there are replaced only when asked."""

from __future__ import annotations

import json
from pathlib import Path

from polymodal.serialization import atomic_write_bytes
from polymodal.errors import ExistingFileError, PathKindError

FILES = ("predictions.jsonl", "results.json")


def check_out(out: Path, overwrite: bool) -> None:
    """Refuses, before any work, a folder that is a file or that holds an earlier evaluation (unless overwrite)."""
    if out.exists() and not out.is_dir():
        raise PathKindError(f"--out expects a folder for {' and '.join(FILES)}, got the file {out}")
    if not overwrite and (found := [name for name in FILES if (out / name).exists()]):
        raise ExistingFileError(f"{out / found[0]} exists (an earlier evaluation): give another --out, or "
                              "--overwrite to replace it")


def write(out: Path, records: list[dict], results: dict) -> None:
    """predictions.jsonl, then results.json (so a results.json always has its predictions beside it)."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(out / "predictions.jsonl", lines.encode("utf-8"))
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2, ensure_ascii=False) + "\n").encode())


def table(rows: list[dict], what: str) -> str:
    """The model's figure beside its blanked-media and majority-answer baselines, per task."""
    w = max([10, *(len(r["task"]) for r in rows)])
    v = max(9, len(what))
    cell = lambda x: "-" if x is None else f"{x:.1%}" if what != "CIDEr-D" else f"{x:.3f}"  # noqa: E731
    lines = [f"{'task':<{w}} {'n':>5} {what:>{v}} {'blanked':>8} {'majority':>9}"]
    lines += [f"{r['task']:<{w}} {r['n']:>5} {cell(r['score']):>{v}} {cell(r['blanked']):>8} {cell(r['majority']):>9}"
              for r in rows]
    return "\n".join(lines)
