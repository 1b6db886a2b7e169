"""Side-by-side speed of a polymodal decoder LM and HF transformers' Llama with the same weights.

Measures, interleaved in one process on the same inputs: prefill latency, greedy decode tokens/s
(HF with its dynamic cache and with its static cache), and training tokens/s (forward + backward +
AdamW step). Prints a markdown table with ratios ours/HF and writes JSON.

    python benchmarks/bench_decoder.py --device cpu --tiny          # CI-size, ratios only
    python benchmarks/bench_decoder.py --device cuda --dtype bfloat16 # the real thing on a GPU
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import polymodal as pm
from polymodal.convert.hf import decoder_config_to_hf
from timing import save_results, timed  # benchmarks/timing.py, beside this script


def build_pair(cfg: pm.DecoderConfig, device: str, dtype: torch.dtype, tmp: Path):
    from transformers import LlamaForCausalLM

    ours = pm.build(cfg)
    from polymodal.convert.hf import save_hf

    save_hf(ours, tmp, "llama")
    hf = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    return ours.to(device=device, dtype=dtype).eval(), hf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tiny", action="store_true", help="small model and budgets (CI-size)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/decoder.json")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        cfg = pm.DecoderConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=1, hidden_dim=768,
                               max_seq_len=1024)
        prompt, new_tokens, batches, train_shape = 64, 32, (1, 8), (4, 128)
    else:  # the decoder of issue 9's 1.1B PaliGemma-style config
        cfg = pm.DecoderConfig(vocab_size=32000, dim=2048, n_layers=16, n_heads=8, n_kv_heads=1, head_dim=256,
                               hidden_dim=16384, max_seq_len=1024)
        prompt, new_tokens, batches, train_shape = 212, 128, (1, 32), (8, 512)
    torch.manual_seed(0)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = build_pair(cfg, args.device, dtype, Path(tmp))
    results = {"device": args.device, "dtype": args.dtype, "config": cfg.to_dict(), "rows": []}

    def row(name, ours_s, hf_s, unit_per_s=None):
        entry = {"metric": name, "ours_s": ours_s, "hf_s": hf_s, "speedup": hf_s / ours_s}
        if unit_per_s is not None:
            entry["ours_per_s"], entry["hf_per_s"] = unit_per_s / ours_s, unit_per_s / hf_s
        results["rows"].append(entry)
        print(f"| {name} | {ours_s * 1e3:.1f} ms | {hf_s * 1e3:.1f} ms | {hf_s / ours_s:.2f}x |", flush=True)

    print("| metric | polymodal | HF | speedup |\n|---|---|---|---|")
    for b in batches:
        ids = torch.randint(0, cfg.vocab_size, (b, prompt), device=args.device)
        with torch.no_grad():
            row(f"prefill b={b} s={prompt}", timed(lambda: ours(ids, logits_to_keep=1), args.device, args.repeats),
                timed(lambda: hf(input_ids=ids, logits_to_keep=1), args.device, args.repeats))
        kw = dict(max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens, pad_token_id=0)
        ours_s = timed(lambda: pm.generate(ours, ids, max_new_tokens=new_tokens), args.device, args.repeats)
        hf_dyn = timed(lambda: hf.generate(input_ids=ids, **kw), args.device, args.repeats)
        hf_static = timed(lambda: hf.generate(input_ids=ids, cache_implementation="static", **kw), args.device,
                          args.repeats)
        row(f"generate b={b} +{new_tokens} (HF dynamic cache)", ours_s, hf_dyn, b * new_tokens)
        row(f"generate b={b} +{new_tokens} (HF static cache)", ours_s, hf_static, b * new_tokens)
    ids = torch.randint(0, cfg.vocab_size, train_shape, device=args.device)
    for model, name in ((ours, "ours"), (hf, "hf")):
        model.train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5)

    def step(model, opt, call):
        loss = call(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda")
    with autocast:
        row(f"train step {train_shape[0]}x{train_shape[1]}",
            timed(lambda: step(ours, opt_ours, lambda m: m(ids, labels=ids).loss), args.device, args.repeats),
            timed(lambda: step(hf, opt_hf, lambda m: m(input_ids=ids, labels=ids).loss), args.device, args.repeats),
            train_shape[0] * train_shape[1])
    save_results(results, args.out)


if __name__ == "__main__":
    main()
