"""Weight-only quantized decoding: polymodal int8 / int4 beside polymodal float32, and beside HF transformers
with its torchao quantization (`TorchAoConfig(Int8WeightOnlyConfig())`) loading the same checkpoint directory.

One process, the same weights and prompts, eager on both sides, greedy decoding of a fixed number of new tokens
(HF: dynamic cache, min_new_tokens = max_new_tokens), timed interleaved. Each row names the two things it
compares; speed is the tokens/s ratio, memory the ratio of bytes held by weights and buffers (a torchao
tensor counted by its inner int8 data and scales). Quality: max logit drift vs the same library's float32.
torchao 0.18 has no CPU int4 layout, so int4 is compared with our float32 only.

    python benchmarks/bench_quantize.py --device cpu --tiny     # CI-size
    python benchmarks/bench_quantize.py --device cpu            # a 65M decoder (what the README reports)
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import polymodal as pm
from polymodal.convert.hf import save_hf
from timing import measure, save_results, timed  # benchmarks/timing.py, beside this script


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu"], help="int4 runs PyTorch's CPU kernel")
    p.add_argument("--tiny", action="store_true", help="small model and budgets (CI-size)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/quantize.json")
    args = p.parse_args()
    import transformers
    from torchao.quantization import Int8WeightOnlyConfig

    torch.set_num_threads(args.threads)
    if args.tiny:
        cfg = pm.DecoderConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=1, hidden_dim=768,
                               max_seq_len=256)
        prompt, new = 16, 16
    else:
        cfg = pm.DecoderConfig(vocab_size=8192, dim=768, n_layers=6, n_heads=12, n_kv_heads=4, hidden_dim=3072,
                               max_seq_len=512)
        prompt, new = 32, 32
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(pm.build(cfg), tmp, "llama")
        ours = {"fp32": pm.from_pretrained(tmp), "int8": pm.from_pretrained(tmp, quantize="int8"),
                "int4": pm.from_pretrained(tmp, quantize="int4")}
        hf = {"fp32": transformers.LlamaForCausalLM.from_pretrained(tmp).eval(),
              "int8": transformers.LlamaForCausalLM.from_pretrained(
                  tmp, quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig()), device_map="cpu").eval()}
    ids = torch.randint(0, cfg.vocab_size, (1, prompt))
    with torch.no_grad():
        logits = {**{f"ours {k}": m(ids).logits for k, m in ours.items()},
                  **{f"HF {k}": m(input_ids=ids).logits for k, m in hf.items()}}
    drift = {name: float((logits[name] - logits[name.split()[0] + " fp32"]).abs().max())
             for name in logits if not name.endswith("fp32")}
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        seconds = {**{f"ours {k}": timed(lambda m=m: pm.generate(m, ids, max_new_tokens=new), "cpu", args.repeats)
                      for k, m in ours.items()},
                   **{f"HF {k}": timed(lambda m=m: m.generate(input_ids=ids, **kw), "cpu", args.repeats)
                      for k, m in hf.items()}}
    with torch.no_grad():  # prefill (the prompt and 1 token) and decode (the other tokens) apart, all interleaved
        split = measure({(k, n): (lambda m=m, n=n: pm.generate(m, ids, max_new_tokens=n))
                         for k, m in ours.items() for n in (1, new + 1)}, "cpu", args.repeats)
    phases = {k: {"prefill_ms": 1e3 * split[k, 1], "decode_ms_per_token": 1e3 * (split[k, new + 1] - split[k, 1]) / new}
              for k in ours}
    memory = {**{f"ours {k}": model_bytes(m) for k, m in ours.items()},
              **{f"HF {k}": model_bytes(m) for k, m in hf.items()}}
    pairs = [("ours int8", "ours fp32"), ("ours int4", "ours fp32"), ("ours int8", "HF int8"),
             ("HF int8", "HF fp32"), ("ours fp32", "HF fp32")]
    label = {"ours fp32": "polymodal float32", "ours int8": "polymodal int8", "ours int4": "polymodal int4 (g32)",
             "HF fp32": "HF float32", "HF int8": "HF + torchao int8"}
    rows = [{"compares": f"{label[a]} vs {label[b]}", "speed": seconds[b] / seconds[a],
             "memory": memory[a] / memory[b]} for a, b in pairs]
    n_params = sum(t.numel() for t in ours["fp32"].parameters())
    print(f"decoder {n_params / 1e6:.0f}M parameters, greedy b=1, {prompt}-token prompt, +{new} tokens, "
          f"{args.threads} thread(s), torch {torch.__version__}, transformers {transformers.__version__}")
    print("| compares | decode tokens/s ratio | weight memory ratio |\n|---|---|---|")
    for r in rows:
        print(f"| {r['compares']} | {r['speed']:.2f}x | {r['memory']:.2f} |")
    print("| model | tokens/s | weight MB | max logit drift vs its float32 |\n|---|---|---|---|")
    for name in seconds:
        print(f"| {label[name]} | {new / seconds[name]:.1f} | {memory[name] / 1e6:.1f} | "
              f"{drift.get(name, 0.0):.4f} |")
    print("| polymodal weights | prefill ms (prompt + 1 token) | decode ms/token | decode vs float32 |\n|---|---|---|---|")
    for k, p in phases.items():
        print(f"| {k} | {p['prefill_ms']:.1f} | {p['decode_ms_per_token']:.2f} | "
              f"{p['decode_ms_per_token'] / phases['fp32']['decode_ms_per_token']:.2f}x the time |")
    results = {"config": cfg.to_dict(), "phases": phases, "prompt": prompt, "new_tokens": new, "rows": rows,
               "tokens_per_s": {k: new / s for k, s in seconds.items()}, "bytes": memory, "max_logit_drift": drift}
    save_results(results, args.out)


if __name__ == "__main__":
    main()
