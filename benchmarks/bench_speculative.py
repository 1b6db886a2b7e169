"""Speculative decoding in polymodal and in HF transformers' assisted generation, beside plain greedy decoding
of both, on a trained target and two drafts.

The models (`toy_pair.py`: a 6-layer target, a 1-layer draft trained to convergence, and the same draft
stopped early, right on ~85% of the answer tokens, so that the target keeps a realistic share of its
proposals) are written as HF Llama checkpoints with the production converter; HF loads them, so both
libraries run the same weights (their logits are compared first). Greedy decoding of the test split's
prompts, every call with the same stop token (<eos>, which ends every answer) and the same budget, eager on
both sides. Every configuration of a batch size is timed in ONE interleaved measurement, and its speed-up is
against the fastest plain decoder of either library at that batch size:

- batch 1 (what HF's assisted generation supports), prompt after prompt: plain greedy (ours, HF); each draft
  with k tokens per round (ours; HF `assistant_model` with a constant schedule and its confidence early stop
  off, set on the draft's generation config, where HF reads them), and HF's default schedule as its own row
  (k = 20 with its adaptive confidence stop at 0.4: what `assistant_model=` alone does); prompt lookup
  (`prompt_lookup_num_tokens` = k, n-grams up to 2 on both);
- batch --batch: plain greedy (ours, HF, rows left-padded), and ours with each drafter.

Every output is asserted equal to our plain greedy tokens at batch 1 (greedy speculation must not change
them), and each HF assisted row is asserted to have run its draft with the schedule it names. Counted from
the target's and drafts' forward calls, at batch 1: *tokens per target forward* (the prefill included; 1.0
for plain decoding) and *drafts kept*: the share of drafted tokens the target accepted (tokens written minus
verification rounds, over tokens drafted; ours drafts k per round, HF one per draft forward).

    python benchmarks/bench_speculative.py            # trains the models once (a few CPU minutes), then measures
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaForCausalLM

import polymodal as pm
import toy_pair  # benchmarks/toy_pair.py, beside this script
from polymodal.convert.hf import save_hf
from same_work import require, same_tokens
from timing import measure

DRAFTS = ("draft", "weak draft")
HF_DEFAULT = dict(num_assistant_tokens=20, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.4)


def hf_models(models: dict, k: int) -> dict:
    """HF copies of the models: the target, and each draft twice, with a constant k-token schedule
    ("<draft> k=<k>") and with HF's default schedule ("<draft> HF default")."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            save_hf(model, Path(tmp) / name, "llama")
        out["target"] = LlamaForCausalLM.from_pretrained(Path(tmp) / "target").eval()
        for name in DRAFTS:
            out[f"{name} k={k}"] = LlamaForCausalLM.from_pretrained(Path(tmp) / name).eval()
            out[f"{name} HF default"] = LlamaForCausalLM.from_pretrained(Path(tmp) / name).eval()
    for name in DRAFTS:
        out[f"{name} k={k}"].generation_config.update(num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                                                      assistant_confidence_threshold=0.0)
        config = out[f"{name} HF default"].generation_config
        require(f"HF {name} with its default schedule", all(getattr(config, key) is None for key in HF_DEFAULT)
                and all(GenerationConfig._get_default_generation_params()[key] == v for key, v in HF_DEFAULT.items()),
                f"the draft's generation config sets its schedule, or HF's defaults are no longer {HF_DEFAULT}")
    return out


def configurations(models: dict, hf: dict, rows: list, batch: int, k: int) -> tuple[dict, dict]:
    """name -> fn() decoding every prompt (its new tokens, one tensor per row), at batch 1 and at `batch`;
    and name -> (the target and drafts whose forwards that configuration counts, ours or HF's)."""
    stop = dict(max_new_tokens=toy_pair.DIGITS + 1, eos_token_id=toy_pair.EOS, pad_token_id=toy_pair.EOS)
    singles = [torch.tensor([r]) for r in rows]
    batches = [toy_pair.left_padded(rows[i:i + batch]) for i in range(0, len(rows), batch)]
    target, hf_target = models["target"], hf["target"]

    def ours(b: int, **drafting):
        if b == 1:
            return lambda: [pm.generate(target, ids, **stop, **drafting)[0] for ids in singles]
        return lambda: [row for ids, am in batches for row in pm.generate(target, ids, am, **stop, **drafting)]

    def theirs(b: int, **drafting):
        if b == 1:
            return lambda: [hf_target.generate(input_ids=ids, do_sample=False, **stop, **drafting)[0, ids.shape[1]:]
                            for ids in singles]
        return lambda: [row for ids, am in batches for row in hf_target.generate(
            input_ids=ids, attention_mask=am, do_sample=False, **stop, **drafting)[:, ids.shape[1]:]]

    fns = {1: {"ours plain": ours(1), "HF plain": theirs(1)}, batch: {}}
    counts = {"ours plain": (target, None), "HF plain": (hf_target, None)}
    for name in DRAFTS:
        fns[1][f"ours {name}, k={k}"] = ours(1, assistant_model=models[name], num_assistant_tokens=k)
        counts[f"ours {name}, k={k}"] = (target, None)
        for schedule in (f"k={k}", "HF default"):
            fns[1][f"HF {name}, {schedule}"] = theirs(1, assistant_model=hf[f"{name} {schedule}"])
            counts[f"HF {name}, {schedule}"] = (hf_target, hf[f"{name} {schedule}"])
    fns[1] |= {f"ours prompt lookup, k={k}": ours(1, prompt_lookup_num_tokens=k),
               f"HF prompt lookup, k={k}": theirs(1, prompt_lookup_num_tokens=k)}
    counts |= {f"ours prompt lookup, k={k}": (target, None), f"HF prompt lookup, k={k}": (hf_target, None)}
    fns[batch] |= {"ours plain": ours(batch), "HF plain": theirs(batch),
                   **{f"ours {name}, k={k}": ours(batch, assistant_model=models[name], num_assistant_tokens=k)
                      for name in DRAFTS},
                   f"ours prompt lookup, k={k}": ours(batch, prompt_lookup_num_tokens=k)}
    return fns, counts


def written(outs: list[torch.Tensor]) -> int:
    """Tokens written up to and including each row's stop token."""
    return sum(r.index(toy_pair.EOS) + 1 if toy_pair.EOS in r else len(r) for r in map(torch.Tensor.tolist, outs))


def forwards(fn, target: torch.nn.Module, draft: torch.nn.Module | None) -> tuple[list, int, int]:
    """fn's outputs, and the forward calls of the target and of the draft (0 without one) while it ran."""
    calls = {"target": 0, "draft": 0}
    hooks = [m.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
             for n, m in (("target", target), ("draft", draft)) if m is not None]
    outs = fn()
    for h in hooks:
        h.remove()
    return outs, calls["target"], calls["draft"]


def efficiency(name: str, fn, counted: tuple, prompts: int, k: int) -> dict:
    """Tokens per target forward and (with a draft model) the share of drafted tokens kept, at batch 1."""
    outs, target_calls, draft_calls = forwards(fn, *counted)
    tokens = written(outs)
    out = {"tokens_per_target_forward": tokens / target_calls}
    if "draft" in name:
        rounds = target_calls - (prompts if name.startswith("ours") else 0)  # ours prefills the target first
        drafted = k * rounds if name.startswith("ours") else draft_calls  # HF drafts one token per forward
        require(name, drafted > 0 and (f"k={k}" not in name or drafted <= k * rounds),
                f"{drafted} tokens drafted in {rounds} rounds: not the schedule the row names")
        out["drafts_kept"] = (tokens - rounds) / drafted
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=3000,
                   help="training step limit of each model (default: %(default)s)")
    p.add_argument("--k", type=int, default=4, help="tokens drafted per round (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="benchmarks/results/toy_pair", help="where the trained models are kept")
    p.add_argument("--out", default="benchmarks/results/speculative.json")
    args = p.parse_args()
    torch.manual_seed(0)
    models, logs = toy_pair.trained_models(Path(args.models), args.max_steps)
    hf = hf_models(models, args.k)
    rows, _ = toy_pair.prompts(2, args.prompts)
    with torch.no_grad():
        diff = max((models["target"](ids).logits - hf["target"](input_ids=ids).logits).abs().max().item()
                   for ids in (torch.tensor([r]) for r in rows))
        fns, counts = configurations(models, hf, rows, args.batch, args.k)
        outputs = {f"b={b} {name}": fn() for b in fns for name, fn in fns[b].items()}
        same_tokens("greedy decoding of the test prompts", {n: torch.nn.utils.rnn.pad_sequence(
            o, batch_first=True, padding_value=toy_pair.EOS) for n, o in outputs.items()}, "b=1 ours plain")
        counted = {name: efficiency(name, fns[1][name], counts[name], args.prompts, args.k) for name in fns[1]}
        times = {b: measure(fns[b], "cpu", args.repeats) for b in fns}
    sizes = {name: sum(t.numel() for t in m.parameters()) for name, m in models.items()}
    accuracy = {name: toy_pair.token_accuracy(m, 2, args.prompts) for name, m in models.items()}
    tokens = written(outputs["b=1 ours plain"])
    print(f"target {sizes['target'] / 1e6:.2f}M parameters (6 layers, d=128), drafts {sizes['draft'] / 1e6:.2f}M "
          f"(1 layer, d=64); answer tokens right on the {args.prompts} test prompts: "
          + ", ".join(f"{n} {a:.1%}" for n, a in accuracy.items())
          + f"; logits max |ours - HF| {diff:.1e}; {tokens} tokens per pass, every output equal to our plain "
          f"greedy tokens; each batch size timed in one interleaved measurement, {args.repeats} repeats\n")
    print("| configuration (greedy, eager, same stop token) | tokens/s | speed-up vs the fastest plain decoder | "
          "tokens per target forward | drafts kept |\n|---|---|---|---|---|")
    results = {"k": args.k, "prompts": args.prompts, "batch": args.batch, "training": logs, "parameters": sizes,
               "test_token_accuracy": accuracy, "logits_max_abs_diff": diff, "tokens_per_pass": tokens, "rows": []}
    for b, t in times.items():
        fastest = min(("ours plain", "HF plain"), key=t.get)
        for name, seconds in t.items():
            r = {"configuration": name, "batch": b, "tokens_per_s": tokens / seconds,
                 "speedup": t[fastest] / seconds, "against": fastest, **(counted[name] if b == 1 else {})}
            results["rows"].append(r)
            cell = lambda key: f"{r[key]:.2f}" if key in r else "-"  # noqa: E731
            kept = f"{r['drafts_kept']:.0%}" if "drafts_kept" in r else "-"
            print(f"| b={b} {name} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x ({fastest}) | "
                  f"{cell('tokens_per_target_forward')} | {kept} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
