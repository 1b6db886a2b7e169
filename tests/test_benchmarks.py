"""The benchmarks measure like against like: each script's equal-work check passes when both sides did the
same work and fails (UnequalWork, naming what differs) when they did not, on real tiny models of both
libraries; and the PaliGemma benchmark's CPU mode runs as the README says."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import polymodal as pm

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import their helpers from beside them

import bench_decoder  # noqa: E402
import bench_quantize  # noqa: E402
import bench_serve  # noqa: E402
import bench_speculative  # noqa: E402
import toy_pair  # noqa: E402
from same_work import UnequalWork, require, same_lengths, same_tokens  # noqa: E402

MICRO = pm.DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


def test_same_tokens_names_the_row_and_token_that_differ():
    a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    same_tokens("rows", {"ours": a, "HF": a.clone()})
    b = a.clone()
    b[1, 2] = 7
    with pytest.raises(UnequalWork, match="row 1 of HF differs from ours at token 2"):
        same_tokens("rows", {"ours": a, "HF": b})
    with pytest.raises(UnequalWork, match="HF wrote 1 rows, ours 2"):
        same_tokens("rows", {"ours": a, "HF": a[:1]})


def test_same_lengths_and_require_fail_loudly():
    same_lengths("requests", {"ours": [3, 5], "HF": [3, 5]})
    with pytest.raises(UnequalWork, match="for 1 of 2 rows/requests \\(first: #1\\)"):
        same_lengths("requests", {"ours": [3, 5], "HF": [3, 4]})
    with pytest.raises(UnequalWork, match="HF: ran eager"):
        require("HF", False, "ran eager")


def test_decoder_benchmark_sides_agree_and_a_changed_weight_is_caught(tmp_path):
    ours, hf = bench_decoder.build_pair(MICRO, "cpu", torch.float32, tmp_path)
    ids = torch.randint(0, MICRO.vocab_size, (2, 8))
    eos = bench_decoder.unused_token(ours, ids, 8)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0,
              eos_token_id=eos)
    with torch.no_grad():
        same_tokens("generate", {"ours": pm.generate(ours, ids, max_new_tokens=8, eos_token_id=eos),
                                 "HF": hf.generate(**kw)[:, -8:]})
        hf.lm_head.weight.mul_(-1)  # another model: its greedy tokens are not ours
        with pytest.raises(UnequalWork, match="differs from ours"):
            same_tokens("generate", {"ours": pm.generate(ours, ids, max_new_tokens=8, eos_token_id=eos),
                                     "HF": hf.generate(**kw)[:, -8:]})


def test_quantize_benchmark_writes_every_token_asked_and_catches_an_early_stop():
    ours, hf = bench_quantize.load(MICRO)
    ids = torch.randint(0, MICRO.vocab_size, (1, 8))
    with torch.no_grad():
        stop = bench_quantize.unused_token(list(ours.values()), ids, 5)
        lengths = bench_quantize.warm_up(bench_quantize.generators(ours, hf, ids, stop, compile=False), ours | hf, 4)
        same_lengths("quantized", lengths | {"asked": [1, 5]})
        assert set(lengths) == {"ours fp32", "ours int8", "ours int4", "HF fp32", "HF int8"}
        first = int(pm.generate(ours["ours fp32"], ids, max_new_tokens=1))  # a stop token fp32 writes at once
        lengths = bench_quantize.warm_up(bench_quantize.generators(ours, hf, ids, first, compile=False), ours | hf, 4)
    with pytest.raises(UnequalWork, match="wrote different numbers of tokens"):
        same_lengths("quantized", lengths | {"asked": [1, 5]})


def test_speculative_benchmark_counts_what_drafting_keeps():
    """Random tiny models: greedy speculation still writes plain decoding's tokens on both sides, and the
    counted figures are what they say (a draft kept between none and all; a target forward writes >= 1)."""
    target = pm.build(toy_pair.TARGET.replace(n_layers=1, dim=32, hidden_dim=64))
    models = {"target": target.eval(), "draft": pm.build(toy_pair.DRAFT).eval(), "weak draft": copy.deepcopy(target)}
    hf = bench_speculative.hf_models(models, 2)
    rows, _ = toy_pair.prompts(2, 2)
    with torch.no_grad():
        fns, counts = bench_speculative.configurations(models, hf, rows, 2, 2)
        outs = {f"b={b} {n}": torch.nn.utils.rnn.pad_sequence(f(), batch_first=True, padding_value=toy_pair.EOS)
                for b in fns for n, f in fns[b].items()}
        same_tokens("speculative", outs, "b=1 ours plain")
        for name in ("ours draft, k=2", "HF draft, k=2", "HF draft, HF default", "ours weak draft, k=2"):
            counted = bench_speculative.efficiency(name, fns[1][name], counts[name], 2, 2)
            assert 0 <= counted["drafts_kept"] <= 1 and counted["tokens_per_target_forward"] >= 1, (name, counted)
        # a copy of the target as the draft: every draft is kept (the last round's drafts after <eos> aside)
        assert bench_speculative.efficiency("ours weak draft, k=2", fns[1]["ours weak draft, k=2"],
                                            counts["ours weak draft, k=2"], 2, 2)["drafts_kept"] > 0.9


def test_serve_percentile_is_the_nearest_rank():
    values = [float(v) for v in range(100, 0, -1)]
    assert bench_serve.percentile(values, 50) == 50 and bench_serve.percentile(values, 90) == 90
    assert bench_serve.percentile(values[:10], 90) == 99  # 9th of 10 ranks, not an interpolation


def test_paligemma_benchmark_tiny_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_paligemma.py"), "--device", "cpu", "--tiny",
                           "--repeats", "1", "--no-compile", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["prefill_logits_max_abs_diff"] <= 1e-4
    metrics = [r["metric"] for r in results["rows"]]
    assert metrics == [
        "prefill b=1, 32 tokens: ours eager vs HF eager (forward filling a KV cache)",
        "decode b=1 +64: ours eager vs HF eager, dynamic cache (stop checked every step)",
        "decode b=1 +64: ours eager vs HF eager, static cache (stop checked every step)",
        "prefill b=8, 32 tokens: ours eager vs HF eager (forward filling a KV cache)",
        "decode b=8 +64: ours eager vs HF eager, dynamic cache (stop checked every step)",
        "decode b=8 +64: ours eager vs HF eager, static cache (stop checked every step)",
        "train step 8x128: ours eager (chunked loss, no full logits) vs HF eager (full logits)",
        "train step 8x128: ours eager vs HF eager, same loss (full logits + F.cross_entropy)"]
    assert all(r["ours"] > 0 and r["hf"] > 0 and r["ratio"] > 0 for r in results["rows"])
    assert out.with_suffix(".md").read_text().startswith("| metric | speed ours/HF |")


def test_flex_training_is_refused_on_cpu():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_paligemma.py"), "--device", "cpu", "--tiny",
                           "--attention", "flex"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--attention flex trains on CUDA only" in proc.stderr
