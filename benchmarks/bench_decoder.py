"""Side-by-side speed of a polymodal decoder LM and HF transformers' Llama with the same weights.

Measured interleaved in one process (the two libraries take turns, call by call) on the same inputs,
like with like, each row naming both sides, both eager: prefill latency (one forward over the prompt
that fills a KV cache and returns the last logits, on both sides), greedy generation (both sides given
the same stop token, one neither generates, so both run every step and check it every step; the greedy
tokens of every side asserted equal before any timing; HF with its dynamic cache and with its static
cache), and training tokens/s (forward + backward + AdamW step),
once with each library's own loss (ours chunked, never holding the full logits; HF's from full logits)
and once with the same loss on both (full logits + F.cross_entropy). Prints a markdown table with
ratios ours/HF and writes JSON.

    python benchmarks/bench_decoder.py --device cpu --tiny          # CI-size (4M parameters)
    python benchmarks/bench_decoder.py --device cpu --medium        # 125M parameters
    python benchmarks/bench_decoder.py --device cuda --dtype bfloat16 # the real thing on a GPU
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import polymodal as pm
from polymodal.convert.hf import save_hf
from same_work import same_tokens  # benchmarks/same_work.py, beside this script
from timing import measure, save_results


def build_pair(cfg: pm.DecoderConfig, device: str, dtype: torch.dtype, tmp: Path):
    from transformers import LlamaForCausalLM

    ours = pm.build(cfg)
    save_hf(ours, tmp, "llama")
    hf = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    return ours.to(device=device, dtype=dtype).eval(), hf


def unused_token(model, ids: torch.Tensor, new_tokens: int) -> int:
    """A token greedy decoding of these prompts never picks: a stop token both sides check without
    stopping early."""
    used = set(pm.generate(model, ids, max_new_tokens=new_tokens).unique().tolist())
    return next(t for t in range(model.config.vocab_size) if t not in used)


def same_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tiny", action="store_true", help="small model and budgets (CI-size)")
    p.add_argument("--medium", action="store_true", help="a 0.1B Llama-shaped decoder (d=768, 12 layers)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/decoder.json")
    args = p.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    if args.tiny:
        cfg = pm.DecoderConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=1, hidden_dim=768,
                               max_seq_len=1024)
        prompt, new_tokens, batches, train_shape = 64, 32, (1, 8), (4, 128)
    elif args.medium:
        cfg = pm.DecoderConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, hidden_dim=2048,
                               max_seq_len=1024)
        prompt, new_tokens, batches, train_shape = 64, 32, (1, 8), (4, 128)
    else:  # the decoder of issue 9's 1.1B PaliGemma-style config
        cfg = pm.DecoderConfig(vocab_size=32000, dim=2048, n_layers=16, n_heads=8, n_kv_heads=1, head_dim=256,
                               hidden_dim=16384, max_seq_len=1024)
        prompt, new_tokens, batches, train_shape = 212, 128, (1, 32), (8, 512)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = build_pair(cfg, device, dtype, Path(tmp))
    results = {"device": device, "dtype": args.dtype, "config": cfg.to_dict(), "rows": []}

    def row(name, ours_s, hf_s, units=None):
        entry = {"metric": name, "ours_s": ours_s, "hf_s": hf_s, "speedup": hf_s / ours_s}
        if units is not None:
            entry["ours_per_s"], entry["hf_per_s"] = units / ours_s, units / hf_s
        results["rows"].append(entry)
        print(f"| {name} | {ours_s * 1e3:.1f} ms | {hf_s * 1e3:.1f} ms | {hf_s / ours_s:.2f}x |", flush=True)

    n_params = sum(t.numel() for t in ours.parameters())
    results["parameters"] = n_params
    print(f"decoder {n_params / 1e6:.1f}M parameters, {device}, {args.dtype}, {torch.get_num_threads()} thread(s); "
          "greedy tokens asserted equal on all sides; both check the stop token every step")
    print("| metric (ours vs HF) | polymodal | HF | speedup |\n|---|---|---|---|")
    for b in batches:
        ids = torch.randint(0, cfg.vocab_size, (b, prompt), device=device)
        eos = unused_token(ours, ids, new_tokens)
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, eos_token_id=eos)
        calls = {
            "prefill ours": lambda: ours(ids, cache=ours.make_cache(b, prompt + new_tokens), logits_to_keep=1),
            "prefill hf": lambda: hf(input_ids=ids, use_cache=True, logits_to_keep=1),
            "ours": lambda: pm.generate(ours, ids, max_new_tokens=new_tokens, eos_token_id=eos),
            "hf dynamic": lambda: hf.generate(**kw),
            "hf static": lambda: hf.generate(cache_implementation="static", disable_compile=True, **kw),
        }
        same_tokens(f"generate b={b}", {name: calls[name]()[:, -new_tokens:] for name in ("ours", "hf dynamic",
                                                                                      "hf static")})
        with torch.no_grad():
            t = measure(calls, device, args.repeats)
        row(f"prefill b={b} s={prompt}: ours eager vs HF eager (forward filling a KV cache)", t["prefill ours"],
            t["prefill hf"])
        for ref, cache in (("hf dynamic", "dynamic"), ("hf static", "static")):
            row(f"generate b={b} +{new_tokens}: ours eager vs HF eager, {cache} cache (same stop token)",
                t["ours"], t[ref], b * new_tokens)
    ids = torch.randint(0, cfg.vocab_size, train_shape, device=device)
    ours.train(), hf.train()
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (ours, hf)}

    def step(model, loss_fn) -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn()
        loss.backward()
        optimizers[model].step()
        optimizers[model].zero_grad(set_to_none=True)

    t = measure({
        "ours": lambda: step(ours, lambda: ours(ids, labels=ids).loss),
        "hf": lambda: step(hf, lambda: hf(input_ids=ids, labels=ids).loss),
        "ours same": lambda: step(ours, lambda: same_loss(ours(ids).logits, ids)),
        "hf same": lambda: step(hf, lambda: same_loss(hf(input_ids=ids).logits, ids)),
    }, device, args.repeats)
    name, n = f"train step {train_shape[0]}x{train_shape[1]}", train_shape[0] * train_shape[1]
    row(f"{name}: ours eager (chunked loss, no full logits) vs HF eager (full logits)", t["ours"], t["hf"], n)
    row(f"{name}: ours eager vs HF eager, same loss (full logits + F.cross_entropy)", t["ours same"], t["hf same"], n)
    save_results(results, args.out)


if __name__ == "__main__":
    main()
