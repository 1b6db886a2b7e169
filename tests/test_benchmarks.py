"""The PaliGemma benchmark's CPU mode runs as the README says and measures like against like: the same
weights in polymodal and HF transformers give the same logits, and every row it reports is a real ratio."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_paligemma.py"


def test_paligemma_benchmark_tiny_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--tiny", "--repeats", "1", "--no-compile",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["prefill_logits_max_abs_diff"] <= 1e-4
    metrics = [r["metric"] for r in results["rows"]]
    assert metrics == [
        "prefill b=1, 32 tokens: ours eager vs HF eager (forward filling a KV cache)",
        "decode b=1 +64: ours eager vs HF eager, dynamic cache", "decode b=1 +64: ours eager vs HF eager, static cache",
        "prefill b=8, 32 tokens: ours eager vs HF eager (forward filling a KV cache)",
        "decode b=8 +64: ours eager vs HF eager, dynamic cache", "decode b=8 +64: ours eager vs HF eager, static cache",
        "train step 8x128: ours eager (chunked loss, no full logits) vs HF eager (full logits)",
        "train step 8x128: ours eager vs HF eager, same loss (full logits + F.cross_entropy)"]
    assert not [n for n in results["notes"] if "differ" in n]  # both sides decode the same greedy tokens
    assert all(r["ours"] > 0 and r["hf"] > 0 and r["ratio"] > 0 for r in results["rows"])
    assert out.with_suffix(".md").read_text().startswith("| metric | speed ours/HF |")


def test_flex_training_is_refused_on_cpu():
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--tiny", "--attention", "flex"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--attention flex trains on CUDA only" in proc.stderr
