"""The benchmarks measure like against like: each script's equal-work check passes when both sides did the
same work and fails (UnequalWork, naming what differs) when they did not, on real tiny models of both
libraries; the serving benchmark's statistics follow vLLM's definitions, its Poisson arrivals are seeded, and
its KV memory is the bytes the caches allocated; and the PaliGemma benchmark's CPU mode runs as the README says."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import polymodal as pm

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import their helpers from beside them

import bench_batcher  # noqa: E402
import bench_decoder  # noqa: E402
import bench_quantize  # noqa: E402
import bench_serve  # noqa: E402
import bench_speculative  # noqa: E402
import toy_pair  # noqa: E402
from polymodal.nn.paged_cache import PagedCache, kv_bytes  # noqa: E402
from same_work import UnequalWork, require, same_lengths, same_tokens  # noqa: E402
from serving_stats import Record, Slo, arrival_times, summarise  # noqa: E402

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


def test_serving_figures_are_vllms_definitions():
    """TTFT, TPOT, ITL, end-to-end and goodput of hand-timed requests, each worked out here from its definition."""
    fast = Record(sent=0.0, done=0.5, tokens=5, chunks=[0.1, 0.2, 0.3, 0.5])  # ttft 100 ms, tpot 100 ms
    slow = Record(sent=1.0, done=3.0, tokens=3, chunks=[1.4, 3.0])  # ttft 400 ms, tpot 800 ms
    single = Record(sent=0.2, done=0.3, tokens=1, chunks=[0.3])  # one token: no TPOT, no ITL
    assert fast.ttft == pytest.approx(0.1) and fast.tpot == pytest.approx(0.4 / 4) and single.tpot is None
    assert fast.itl == pytest.approx([0.1, 0.1, 0.2]) and slow.itl == pytest.approx([1.6]) and single.itl == []
    r = summarise([[fast, slow, single]], Slo(ttft_ms=100, tpot_ms=100))  # the SLO's bound itself is met
    assert r["duration_s"] == pytest.approx(3.0) and r["output_tokens"] == 9
    assert r["requests_per_s"] == pytest.approx(1.0) and r["output_tokens_per_s"] == pytest.approx(3.0)
    assert r["goodput_requests_per_s"] == pytest.approx(2 / 3)  # fast, and single (its ttft 100 ms, no tpot)
    assert r["ttft_mean_ms"] == pytest.approx(200) and r["ttft_median_ms"] == pytest.approx(100)
    assert r["ttft_p99_ms"] == pytest.approx(400) and r["e2e_median_ms"] == pytest.approx(500)
    assert r["tpot_median_ms"] == pytest.approx(100) and r["tpot_p99_ms"] == pytest.approx(800)  # (3.0-1.4)/2 s
    assert r["itl_mean_ms"] == pytest.approx(1e3 * (0.1 + 0.1 + 0.2 + 1.6) / 4)
    assert r["itl_median_ms"] == pytest.approx(100)
    assert summarise([[fast, slow]], Slo(ttft_ms=99, tpot_ms=1000))["goodput_requests_per_s"] == 0
    # two runs of a load point (the servers took turns between them): throughputs over the runs' own wall times,
    # not the gap between them; latencies over every request
    later = Record(sent=10.0, done=11.0, tokens=3, chunks=[10.4, 11.0])
    two = summarise([[fast, slow, single], [later]], Slo(ttft_ms=100, tpot_ms=100))
    assert two["duration_s"] == pytest.approx(4.0) and two["output_tokens_per_s"] == pytest.approx(12 / 4.0)
    assert two["requests"] == 4 and two["ttft_p99_ms"] == pytest.approx(400)


def test_poisson_arrivals_are_seeded_and_exponential():
    times = arrival_times(20_000, rate=50.0, seed=3)
    assert times == arrival_times(20_000, rate=50.0, seed=3) and times != arrival_times(20_000, rate=50.0, seed=4)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and min(gaps) > 0
    mean = sum(gaps) / len(gaps)
    sd = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert mean == pytest.approx(1 / 50, rel=0.03) and sd == pytest.approx(mean, rel=0.05)  # exponential: sd = mean
    assert sum(g > mean for g in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.01)  # P(gap > mean) = 1/e
    with pytest.raises(ValueError, match="rate > 0"):
        arrival_times(4, rate=0.0, seed=0)


def test_kv_memory_is_measured_from_allocated_tensors():
    """The benchmark's cache bytes are the storages the cache really holds, each once (a view adds nothing):
    the static cache's are its slots x context of K/V and segments, a paged pool's its blocks'."""
    model = pm.build(MICRO)
    shape = (MICRO.n_layers, MICRO.n_kv_heads, MICRO.dim // MICRO.n_heads, torch.float32)
    static = model.make_cache(3, 40)
    assert bench_batcher.allocated_bytes(static) == kv_bytes(3 * 40, *shape) + 8  # + the cache's fill counter
    static.layers.append(static.layers[0])  # the same tensors twice: counted once
    static.extra = static.layers[1].k[:, :, :5]
    assert bench_batcher.allocated_bytes(static) == kv_bytes(3 * 40, *shape) + 8
    paged = PagedCache.for_model(model, n_blocks=7, block_size=4)
    assert bench_batcher.allocated_bytes(paged) == kv_bytes(7 * 4, *shape)


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
