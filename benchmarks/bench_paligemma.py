"""Side-by-side speed of polymodal's PaliGemma and HF transformers' PaliGemmaForConditionalGeneration.

Issue 9's 1.1B config (SigLIP-B/16 224px + a 16-layer d=2048 Gemma decoder, MQA, 32k vocabulary), the
same random weights in both (copied through polymodal's HF converter) and the same inputs, compared like
with like, each row naming both sides. Measured interleaved in one process: prefill latency (one forward
over vision + 196 image + 16 prompt tokens that fills a KV cache, last logits only, on both sides); greedy
decode tokens/s at batch 1 and 32 (128 new tokens, prefill subtracted), both sides given the same stop token
(one neither generates, so both run every step and do their stop checks: every step eager, every STOP_EVERY
steps in ours compiled, as its rows say) and the greedy tokens of every side asserted equal, ours eager against HF eager
(dynamic and static cache) and, with --compile (the default), ours compiled against HF's static cache
compiled through its `CompileConfig` (on CPU too); training tokens/s and MFU (forward + backward + AdamW on
batch 8 x 512; bf16 autocast and fused AdamW on CUDA), eager against eager and compiled against compiled,
once with each library's own loss (ours chunked, never holding the full logits; HF's from full logits) and
once with the same loss on both (full logits + F.cross_entropy). Writes JSON and a markdown table: speed
ours/HF (> 1: polymodal is faster) and the fraction of the H100 ceiling (HBM bandwidth for decode, peak
bf16 for training). On CPU the table holds ratios only.

    python benchmarks/bench_paligemma.py --device cpu --tiny           # CI-size, ratios only
    python benchmarks/bench_paligemma.py --device cpu --medium --repeats 2  # 0.14B, ratios only
    python benchmarks/bench_paligemma.py --device cuda --dtype bfloat16 # the real thing on an H100
    python benchmarks/bench_paligemma.py --device cuda --dtype bfloat16 --attention flex
"""

from __future__ import annotations

import argparse
import json
import tempfile
from functools import partial
from pathlib import Path

import torch
from transformers import CompileConfig

import polymodal as pm
from polymodal.convert.hf import save_hf
from polymodal.encoders.vit import VisionConfig
from polymodal.families.paligemma.config import PaliGemmaConfig
from polymodal.nn.transformer import Block
from polymodal.families.decoder.presets import gemma_2b, gemma_tiny
from polymodal.generation.engine import STOP_EVERY
from same_work import same_tokens  # benchmarks/same_work.py, beside this script
from timing import measure

H100_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak, H100 SXM
H100_HBM_BYTES_PER_S = 3.35e12  # HBM3, H100 SXM
PROMPT_TOKENS = 16  # <bos> + 15 text tokens after the image tokens


def paligemma_config(size: str) -> PaliGemmaConfig:
    if size == "tiny":
        vision = VisionConfig(image_size=32, patch_size=8, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                              pooling_head=False)
        text = gemma_tiny().replace(dim=128, head_dim=32, hidden_dim=256, vocab_size=1024, max_seq_len=256,
                                    pad_token_id=0, bos_token_id=2, eos_token_id=1)
    elif size == "medium":  # a 6-layer d=384 SigLIP-style tower on 112px images (49 tokens) + a 12-layer d=768
        vision = VisionConfig(image_size=112, patch_size=16, dim=384, n_layers=6, n_heads=6, hidden_dim=1536,
                              pooling_head=False)  # Gemma-style decoder, MQA, 32k vocabulary: 0.14B in all
        text = gemma_tiny().replace(dim=768, n_layers=12, n_heads=12, head_dim=64, hidden_dim=3072,
                                    vocab_size=32000, max_seq_len=512, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    else:  # SigLIP-B/16 (VisionConfig's defaults) + Gemma 2B's layers, 16 of them, MLP 8192 wide: 1.1B in all
        vision = VisionConfig(pooling_head=False)
        text = gemma_2b().replace(vocab_size=32000, n_layers=16, hidden_dim=8192, max_seq_len=1024)
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=text.vocab_size - 1)


def build_pair(cfg: PaliGemmaConfig, device: str, tmp: Path, attention: str = "sdpa"):
    from transformers import PaliGemmaForConditionalGeneration

    ours = pm.build(cfg, backend=attention)
    save_hf(ours, tmp, "paligemma")
    hf = PaliGemmaForConditionalGeneration.from_pretrained(tmp)
    return ours.to(device), hf.to(device)


def prompts(cfg: PaliGemmaConfig, batch: int, length: int, device: str):
    """Rows of [image tokens, <bos>, text], token_type_ids 0 over image + prompt and 1 after, images."""
    n_img = cfg.tokens_per_image
    text = torch.randint(3, cfg.image_token_id, (batch, length - n_img))
    text[:, 0] = cfg.text.bos_token_id
    ids = torch.cat((torch.full((batch, n_img), cfg.image_token_id), text), 1)
    types = (torch.arange(length) >= n_img + PROMPT_TOKENS).long().expand(batch, -1)
    px = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size)
    return ids.to(device), types.to(device), px.to(device)


def unused_token(model, ids: torch.Tensor, px: torch.Tensor, new_tokens: int) -> int:
    """A text token that greedy decoding of these prompts never picks: a stop token both libraries check
    every step without stopping early (random weights would otherwise end rows at different lengths)."""
    used = set(pm.generate(model, ids, pixel_values=px, max_new_tokens=new_tokens).unique().tolist())
    return next(t for t in range(3, model.config.image_token_id) if t not in used)


def matmul_weights(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Weights that multiply every token: matrices, a tied embedding (the output head) included."""
    return sum(p.numel() for name, p in module.named_parameters() if p.dim() >= 2 and name not in skip)


def train_flops_per_token(model, batch: int, seq: int) -> float:
    """PaLM's model FLOPs (Chowdhery et al. 2022, app. B): 6 per weight per token plus 12 * layers * width *
    context for attention, for the decoder over batch * seq tokens and the ViT + projector over the images."""
    t, v, n_img = model.config.text, model.config.vision, model.config.tokens_per_image
    decoder = 6 * matmul_weights(model.decoder) + 12 * t.n_layers * t.n_heads * t.head_size * seq
    vision = (6 * (matmul_weights(model.vision, skip=("pos_embed.weight",)) + matmul_weights(model.projector))
              + 12 * v.n_layers * v.dim * n_img)
    return decoder + vision * n_img / seq


def decode_ceiling(model, batch: int, context: float, dtype: torch.dtype) -> float:
    """Tokens/s if each decode step only read the decoder's weights and the KV cache (context tokens) from HBM."""
    t = model.config.text
    kv = batch * t.n_layers * 2 * t.kv_heads * t.head_size * context
    return batch * H100_HBM_BYTES_PER_S / ((sum(p.numel() for p in model.decoder.parameters()) + kv) * dtype.itemsize)


def table(rows: list[dict], ratios_only: bool) -> str:
    if ratios_only:
        lines = ["| metric | speed ours/HF |", "|---|---|"]
        return "\n".join(lines + [f"| {r['metric']} | {r['ratio']:.2f}x |" for r in rows])
    lines = ["| metric | polymodal | HF | speed ours/HF | ours of ceiling | HF of ceiling |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        fmt = (lambda x: f"{x * 1e3:.1f} ms") if r["unit"] == "s" else (lambda x: f"{x:,.0f} tok/s")
        frac = [f"{r[k]:.1%}" if k in r else "" for k in ("ours_of_ceiling", "hf_of_ceiling")]
        lines.append(f"| {r['metric']} | {fmt(r['ours'])} | {fmt(r['hf'])} | {r['ratio']:.2f}x | {' | '.join(frac)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights for prefill/decode")
    p.add_argument("--tiny", action="store_true", help="small model and budgets (CI-size)")
    p.add_argument("--medium", action="store_true", help="a 0.14B model, CPU-size budgets")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "flex"],
                   help="our decoder's attention kernel (flex: FlexAttention block masks; trains on CUDA only)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure compiled decoding (pm.generate(compile=True)) and compiled training "
                        "(every block of ours, the whole HF model)")
    p.add_argument("--out", help="JSON path (default: benchmarks/results/paligemma_<device>[_tiny|_medium].json)")
    args = p.parse_args()
    device, dtype, cuda = args.device, getattr(torch, args.dtype), args.device == "cuda"
    if args.attention == "flex" and not cuda:
        p.error("--attention flex trains on CUDA only (PyTorch has no FlexAttention backward on CPU)")
    size = "tiny" if args.tiny else "medium" if args.medium else "full"
    out = Path(args.out or f"benchmarks/results/paligemma_{device}{'' if size == 'full' else '_' + size}.json")
    new_tokens, batches, train_shape = {"tiny": (64, (1, 8), (8, 128)), "medium": (32, (1, 8), (4, 128)),
                                        "full": (128, (1, 32), (8, 512))}[size]
    torch.manual_seed(0)
    cfg = paligemma_config(size)
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = build_pair(cfg, device, Path(tmp), args.attention)
    ours, hf = ours.to(dtype).eval(), hf.to(dtype).eval()
    prompt = cfg.tokens_per_image + PROMPT_TOKENS
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": args.dtype, "size": size,
               "attention": args.attention,
               "config": cfg.to_dict(), "notes": [], "rows": []}

    def note(text: str) -> None:
        results["notes"].append(text)
        print(f"note: {text}", flush=True)

    def row(metric: str, unit: str, ours_v: float, hf_v: float, ceiling: float | None = None) -> None:
        r = {"metric": metric, "unit": unit, "ours": ours_v, "hf": hf_v,
             "ratio": hf_v / ours_v if unit == "s" else ours_v / hf_v}
        if ceiling is not None:
            r |= {"ceiling": ceiling, "ours_of_ceiling": ours_v / ceiling, "hf_of_ceiling": hf_v / ceiling}
        results["rows"].append(r)
        print(f"{metric}: {r['ratio']:.2f}x", flush=True)

    ids, _, px = prompts(cfg, 1, prompt, device)
    with torch.no_grad():
        diff = (ours(ids, px, logits_to_keep=1).logits - hf(input_ids=ids, pixel_values=px, logits_to_keep=1).logits)
    results["prefill_logits_max_abs_diff"] = diff.abs().max().item()
    print(f"same weights: max |logits ours - HF| = {results['prefill_logits_max_abs_diff']:.2e}", flush=True)

    hf_compile = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else "default")
    hf_compile._compile_all_devices = True  # HF's switch for compiling on CPU too (its default: CUDA only)
    note("prefill: one forward over the prompt that fills a KV cache and returns the last logits, on both sides")
    note("decode: greedy, the tokens asserted equal on every side; both sides are given the same stop token, one "
         f"that neither generates, so both run every step and do their stop checks (HF every step, ours every "
         f"{STOP_EVERY} steps when compiled)")
    note("train: ours computes its loss in chunks and never holds the full logits, HF builds them; the rows "
         "'same loss' give both full logits and one F.cross_entropy")
    for b in batches:
        ids, _, px = prompts(cfg, b, prompt, device)
        eos = unused_token(ours, ids, px, new_tokens)
        hf_kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px, do_sample=False,
                     pad_token_id=0, eos_token_id=eos)
        gens = {
            "ours eager": lambda n: pm.generate(ours, ids, pixel_values=px, max_new_tokens=n, eos_token_id=eos),
            "HF eager, dynamic cache": lambda n: hf.generate(max_new_tokens=n, **hf_kw),
            "HF eager, static cache": lambda n: hf.generate(max_new_tokens=n, cache_implementation="static",
                                                            disable_compile=True, **hf_kw),
        }
        if args.compile:
            gens["ours compiled"] = lambda n: pm.generate(ours, ids, pixel_values=px, max_new_tokens=n,
                                                          eos_token_id=eos, compile=True)
            gens["HF compiled, static cache"] = lambda n: hf.generate(
                max_new_tokens=n, cache_implementation="static", compile_config=hf_compile, **hf_kw)
        same_tokens(f"decode b={b}", {name: f(new_tokens).cpu()[:, -new_tokens:] for name, f in gens.items()})
        prefill = {
            "ours": lambda: ours(ids, px, cache=ours.make_cache(b, prompt + new_tokens), logits_to_keep=1),
            "hf": lambda: hf(input_ids=ids, pixel_values=px, use_cache=True, logits_to_keep=1),
        }
        with torch.no_grad():
            t = measure(prefill, device, args.repeats)
        row(f"prefill b={b}, {prompt} tokens: ours eager vs HF eager (forward filling a KV cache)", "s",
            t["ours"], t["hf"])
        calls = {(name, n): partial(f, n) for name, f in gens.items() for n in (1, new_tokens)}
        t = measure(calls, device, args.repeats)
        decode = {name: b * (new_tokens - 1) / (t[name, new_tokens] - t[name, 1]) for name in gens}
        ceiling = decode_ceiling(ours, b, prompt + new_tokens / 2, dtype) if cuda else None
        pairs = [("ours eager", "HF eager, dynamic cache"), ("ours eager", "HF eager, static cache")]
        if args.compile:
            pairs.append(("ours compiled", "HF compiled, static cache"))
        for a, ref in pairs:
            cadence = (f" (stop checked: ours every {STOP_EVERY} steps, HF every step)" if "compiled" in a
                       else " (stop checked every step)")
            row(f"decode b={b} +{new_tokens}: {a} vs {ref}{cadence}", "tokens/s", decode[a], decode[ref], ceiling)

    ours, hf = ours.float().train(), hf.float().train()
    ids, types, px = prompts(cfg, *train_shape, device)
    labels = ids.masked_fill(types == 0, -100)
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-5, fused=cuda) for m in (ours, hf)}

    def step(model, loss_fn) -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn()
        loss.backward()
        optimizers[model].step()
        optimizers[model].zero_grad(set_to_none=True)

    def same_loss(model, **inputs) -> torch.Tensor:  # full logits, then one cross-entropy for both
        logits = model(**inputs).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    train_steps = {
        "ours": lambda: step(ours, lambda: ours(ids, px, token_type_ids=types, labels=labels).loss),
        "hf": lambda: step(hf, lambda: hf(input_ids=ids, pixel_values=px, token_type_ids=types, labels=labels).loss),
        "ours, same loss": lambda: step(ours, lambda: same_loss(ours, input_ids=ids, pixel_values=px,
                                                                 token_type_ids=types)),
        "hf, same loss": lambda: step(hf, lambda: same_loss(hf, input_ids=ids, pixel_values=px, token_type_ids=types)),
    }
    tokens = train_shape[0] * train_shape[1]
    ceiling = H100_BF16_FLOPS / train_flops_per_token(ours, *train_shape) if cuda else None
    name = f"train step {train_shape[0]}x{train_shape[1]}" + (" (of ceiling: MFU)" if cuda else "")

    def train_rows(mode: str) -> None:
        t = measure(train_steps, device, args.repeats)
        row(f"{name}: ours {mode} (chunked loss, no full logits) vs HF {mode} (full logits)", "tokens/s",
            tokens / t["ours"], tokens / t["hf"], ceiling)
        row(f"{name}: ours {mode} vs HF {mode}, same loss (full logits + F.cross_entropy)", "tokens/s",
            tokens / t["ours, same loss"], tokens / t["hf, same loss"], ceiling)

    train_rows("eager")
    if args.compile:  # as `polymodal train --compile`: every transformer block; HF's model compiled whole
        for block in [m for m in ours.modules() if isinstance(m, Block)]:
            block.compile()
        hf.compile()
        train_rows("compiled")

    md = table(results["rows"], ratios_only=not cuda)
    print(md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(md + "\n" + "".join(f"\n{n}" for n in results["notes"]) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
