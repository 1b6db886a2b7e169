"""Timing shared by the benchmarks: median wall seconds, CUDA synchronised around each call."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch


def measure(fns: dict, device: str, repeats: int) -> dict:
    """Median seconds per call of each fn; one warm-up call each, then the fns take turns."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    return measure({"fn": fn}, device, repeats)["fn"]


def save_results(results: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
