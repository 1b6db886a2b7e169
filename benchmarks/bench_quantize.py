"""Weight-only quantized decoding: polymodal int8 / int4 beside polymodal float32, and beside HF transformers
with its torchao quantization (`TorchAoConfig(Int8WeightOnlyConfig())`) loading the same checkpoint directory.

One process, the same weights and prompt, greedy decoding. Every model is timed in ONE interleaved measurement
(`timing.measure`: the calls take turns, so a change in the machine's load falls on all of them), each at
1 new token (the prefill: the prompt's forward and the first token) and at 1 + --new tokens; decode is the
difference per token, so prefill and decode are apart. Both sides are given the same stop token, one that no
model generates, and every call is asserted to have written exactly the tokens it was asked for (the
quantized models' tokens may rightly differ from float32's; their number may not). Eager rows check the stop
token every step on both sides. With --compile (the default), the compiled rows: ours through
`pm.generate(compile=True)` (the decode step compiled, prefill eager, the stop token read every
`STOP_EVERY` steps), HF through its static cache and `CompileConfig` (the decode forward compiled, on CPU too;
the stop token read every step), since torchao is meant to run compiled. Memory: bytes held by weights and
buffers (a torchao tensor counted by its inner int8 data and scales). Quality: max logit drift vs the same
library's float32. torchao 0.18 has no CPU int4 layout, so int4 is compared with our float32 only.

    python benchmarks/bench_quantize.py --tiny       # CI-size
    python benchmarks/bench_quantize.py              # a 64M decoder (what the README reports)
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch._dynamo.utils import counters

import polymodal as pm
from polymodal.convert.hf import save_hf
from polymodal.generation.engine import STOP_EVERY
from same_work import require, same_lengths  # benchmarks/same_work.py, beside this script
from timing import measure, save_results

LABEL = {"ours fp32": "polymodal float32", "ours int8": "polymodal int8", "ours int4": "polymodal int4 (g32)",
         "HF fp32": "HF float32", "HF int8": "HF + torchao int8"}
PAIRS = [("ours int8", "ours fp32"), ("ours int4", "ours fp32"), ("HF int8", "HF fp32"), ("ours int8", "HF int8"),
         ("ours fp32", "HF fp32")]


def tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):  # a tensor subclass (torchao): its inner tensors
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.untyped_storage().nbytes()


def model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def load(cfg: pm.DecoderConfig) -> tuple[dict, dict]:
    """Our three and HF's two models from one checkpoint directory (HF's layout, written by our converter)."""
    import transformers
    from torchao.quantization import Int8WeightOnlyConfig

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(pm.build(cfg), tmp, "llama")
        ours = {k: pm.from_pretrained(tmp, quantize=q) for k, q in (("fp32", None), ("int8", "int8"), ("int4", "int4"))}
        hf = {"fp32": transformers.LlamaForCausalLM.from_pretrained(tmp).eval(),
              "int8": transformers.LlamaForCausalLM.from_pretrained(
                  tmp, quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig()), device_map="cpu").eval()}
    return {f"ours {k}": m for k, m in ours.items()}, {f"HF {k}": m for k, m in hf.items()}


def generators(ours: dict, hf: dict, ids: torch.Tensor, stop: int, compile: bool) -> dict:
    """name -> fn(n) writing n greedy tokens after ids (the new tokens only), eager and (optionally) compiled."""
    from transformers import CompileConfig

    hf_compile = CompileConfig(fullgraph=True, dynamic=False)
    hf_compile._compile_all_devices = True  # HF's switch for compiling on CPU too (its default: CUDA only)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=stop)
    gens = {name: (lambda n, m=m: pm.generate(m, ids, max_new_tokens=n, eos_token_id=stop)) for name, m in ours.items()}
    gens |= {name: (lambda n, m=m: m.generate(max_new_tokens=n, **kw)[:, ids.shape[1]:]) for name, m in hf.items()}
    if compile:  # int4's CPU kernel is not compiled: the compiled rows are float32 and int8
        for k in ("fp32", "int8"):
            gens[f"ours {k} compiled"] = lambda n, m=ours[f"ours {k}"]: pm.generate(
                m, ids, max_new_tokens=n, eos_token_id=stop, compile=True)
            gens[f"HF {k} compiled"] = lambda n, m=hf[f"HF {k}"]: m.generate(
                max_new_tokens=n, cache_implementation="static", compile_config=hf_compile, **kw)[:, ids.shape[1]:]
    return gens


def warm_up(gens: dict, models: dict, new: int) -> dict:
    """Runs every generator once at both lengths and returns the tokens each wrote; asserts that each compiled
    side really ran compiled (ours: a graph compiled by its first call; HF: its generate took the compiled call)."""
    lengths = {}
    for name, g in gens.items():
        graphs = counters["stats"]["unique_graphs"]
        lengths[name] = [g(n).shape[1] for n in (1, new + 1)]
        if name.startswith("ours") and name.endswith("compiled"):
            require(name, counters["stats"]["unique_graphs"] > graphs, "pm.generate(compile=True) compiled no graph")
        if name.startswith("HF") and name.endswith("compiled"):
            require(name, hasattr(models[name.removesuffix(" compiled")], "_compiled_call"),
                    "HF's generate did not take its compiled forward")
    return lengths


def unused_token(models: list, ids: torch.Tensor, new: int) -> int:
    """A token no model's greedy continuation picks: the stop token every side checks without stopping."""
    used = set()
    for m in models:
        used |= set(pm.generate(m, ids, max_new_tokens=new).unique().tolist())
    return next(t for t in range(models[0].config.vocab_size) if t not in used)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small model and budgets (CI-size)")
    p.add_argument("--new", type=int, help="decoded tokens after the first (default: 32, --tiny 8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time compiled decoding (ours float32/int8, HF float32/torchao int8)")
    p.add_argument("--out", default="benchmarks/results/quantize.json")
    args = p.parse_args()
    import transformers

    torch.set_num_threads(args.threads)
    if args.tiny:
        cfg = pm.DecoderConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=1, hidden_dim=768,
                               max_seq_len=256)
        prompt, new = 16, args.new or 8
    else:
        cfg = pm.DecoderConfig(vocab_size=8192, dim=768, n_layers=6, n_heads=12, n_kv_heads=4, hidden_dim=3072,
                               max_seq_len=512)
        prompt, new = 32, args.new or 32
    ours, hf = load(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt))
    with torch.no_grad():
        logits = {**{k: m(ids).logits for k, m in ours.items()}, **{k: m(input_ids=ids).logits for k, m in hf.items()}}
        stop = unused_token(list(ours.values()), ids, new + 1)
        gens = generators(ours, hf, ids, stop, args.compile)
        same_lengths(f"{new + 1} greedy tokens, stop token {stop}",
                     warm_up(gens, ours | hf, new) | {"asked": [1, new + 1]})
        t = measure({(name, n): (lambda g=g, n=n: g(n)) for name, g in gens.items() for n in (1, new + 1)}, "cpu",
                    args.repeats)
    drift = {k: float((v - logits[k.split()[0] + " fp32"]).abs().max()) for k, v in logits.items() if "fp32" not in k}
    phases = {name: {"prefill_ms": 1e3 * t[name, 1], "decode_ms_per_token": 1e3 * (t[name, new + 1] - t[name, 1]) / new}
              for name in gens}
    memory = {k: model_bytes(m) for k, m in (ours | hf).items()}
    n_params = sum(x.numel() for x in ours["ours fp32"].parameters())
    print(f"decoder {n_params / 1e6:.0f}M parameters, greedy b=1, {prompt}-token prompt, 1 + {new} tokens (every call "
          f"asserted to write them all), {args.threads} thread(s), torch {torch.__version__}, transformers "
          f"{transformers.__version__}; all {len(gens)} models timed interleaved, {args.repeats} repeats")
    rows = report(phases, memory, drift, args.compile)
    save_results({"config": cfg.to_dict(), "parameters": n_params, "prompt": prompt, "new_tokens": new,
                  "stop_every_compiled_ours": STOP_EVERY, "phases": phases, "rows": rows, "bytes": memory,
                  "max_logit_drift": drift}, args.out)


def report(phases: dict, memory: dict, drift: dict, compiled: bool) -> list[dict]:
    decode = {k: v["decode_ms_per_token"] for k, v in phases.items()}
    pairs = PAIRS + ([("ours fp32 compiled", "HF fp32 compiled"), ("ours int8 compiled", "HF int8 compiled"),
                      ("HF int8 compiled", "HF fp32 compiled"), ("ours int8 compiled", "ours fp32 compiled")]
                     if compiled else [])
    rows = [{"compares": f"{LABEL[a.removesuffix(' compiled')]} vs {LABEL[b.removesuffix(' compiled')]}"
                         + (", both compiled" if "compiled" in a else ", both eager"),
             "decode_speed": decode[b] / decode[a], "prefill_speed": phases[b]["prefill_ms"] / phases[a]["prefill_ms"],
             "memory": memory[a.removesuffix(" compiled")] / memory[b.removesuffix(" compiled")]} for a, b in pairs]
    print("| compares | decode speed (per-token time ratio) | prefill speed | weight memory ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['compares']} | {r['decode_speed']:.2f}x | {r['prefill_speed']:.2f}x | {r['memory']:.2f} |")
    print("\n| model | prefill ms (prompt + first token) | decode ms/token | weight MB | max logit drift vs its "
          "float32 |\n|---|---|---|---|---|")
    for name, ph in phases.items():
        base = name.removesuffix(" compiled")
        every = f"every {STOP_EVERY} steps" if name.startswith("ours") else "every step"
        mode = f"compiled (stop token read {every})" if name != base else "eager"
        print(f"| {LABEL[base]}, {mode} | {ph['prefill_ms']:.1f} | {ph['decode_ms_per_token']:.2f} | "
              f"{memory[base] / 1e6:.1f} | {drift.get(base, 0.0):.4f} |")
    return rows


if __name__ == "__main__":
    main()
