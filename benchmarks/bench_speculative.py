"""Speculative decoding beside HF transformers' assisted generation, on a trained tiny target/draft pair.

The pair (`toy_parity.py`: a 2-layer target and a 1-layer draft, trained once on running-parity chains and kept in
--models) is written as HF Llama checkpoints with the production converter; HF loads them, so both libraries
run the same weights (their logits are compared first). Greedy decoding of the test split's chain-of-thought
prompts, every call with the same stop token and the same budget, eager on both sides:

- batch 1 (what HF's assisted generation supports), prompt after prompt: plain greedy, a draft model
  (HF `assistant_model`, k tokens per round, HF's constant schedule with its confidence early stop off so it
  also drafts k), prompt lookup (`prompt_lookup_num_tokens`, n-grams up to 2 on both);
- batch --batch (ours only): the same three.

Every output is checked equal across the rows that compare it (speculative == plain == HF). Acceptance
rate: drafts kept per draft proposed, from the target's forward count (rounds) and the tokens written.

    python benchmarks/bench_speculative.py            # trains the pair once, then measures
    python benchmarks/bench_speculative.py --tiny     # CI: a barely trained pair, small budgets
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

import polymodal as pm
import toy_parity  # benchmarks/toy_parity.py, beside this script
from polymodal.convert.hf import save_hf
from timing import measure


def counted(model: torch.nn.Module):
    """A list that grows by one on every forward of model, and the hook to remove."""
    calls = []
    return calls, model.register_forward_hook(lambda *_: calls.append(1))


def new_tokens(rows: torch.Tensor) -> int:
    """Tokens written up to and including each row's stop token."""
    return sum(r.index(toy_parity.EOS) + 1 if toy_parity.EOS in r else len(r) for r in rows.tolist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a barely trained pair, few prompts (CI-size)")
    p.add_argument("--steps", type=int, default=400, help="training steps of each model (default: %(default)s)")
    p.add_argument("--k", type=int, default=4, help="tokens drafted per round (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="benchmarks/results/toy_parity", help="where the trained pair is kept")
    p.add_argument("--out", default="benchmarks/results/speculative.json")
    args = p.parse_args()
    if args.tiny:
        args.steps, args.prompts, args.batch = 30, 4, 2
    torch.manual_seed(0)
    target, draft = toy_parity.trained_pair(Path(args.models), args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("target", target), ("draft", draft)):
            save_hf(model, Path(tmp) / name, "llama")
        hf_target = LlamaForCausalLM.from_pretrained(Path(tmp) / "target").eval()
        hf_draft = LlamaForCausalLM.from_pretrained(Path(tmp) / "draft").eval()
    rows, answers = toy_parity.prompts(2, args.prompts, cot=True)
    singles = [torch.tensor([r]) for r in rows]
    with torch.no_grad():
        diff = max((target(ids).logits - hf_target(input_ids=ids).logits).abs().max().item() for ids in singles)
    budget, k, eos = 32, args.k, toy_parity.EOS
    stop = dict(max_new_tokens=budget, eos_token_id=eos, pad_token_id=eos)
    drafting = {"plain": {}, "draft model": dict(assistant_model=draft, num_assistant_tokens=k),
                "prompt lookup": dict(prompt_lookup_num_tokens=k)}
    hf_drafting = {"plain": {}, "draft model": dict(assistant_model=hf_draft, num_assistant_tokens=k,
                                                    num_assistant_tokens_schedule="constant",
                                                    assistant_confidence_threshold=0.0),
                   "prompt lookup": dict(prompt_lookup_num_tokens=k)}

    def ours_b1(kind):
        return [pm.generate(target, ids, **stop, **drafting[kind])[0] for ids in singles]

    def hf_b1(kind):
        return [hf_target.generate(input_ids=ids, do_sample=False, **stop, **hf_drafting[kind])[0, ids.shape[1]:]
                for ids in singles]

    batches = [toy_parity.left_padded(rows[i:i + args.batch]) for i in range(0, len(rows), args.batch)]

    def ours_batched(kind):
        return [row for ids, am in batches for row in pm.generate(target, ids, am, **stop, **drafting[kind])]

    def padded(outs: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(list(outs), batch_first=True, padding_value=eos)

    def acceptance(fn, model, prefill_calls: int) -> tuple[float, list]:
        calls, hook = counted(model)
        outs = fn()
        hook.remove()
        written = new_tokens(padded(outs))
        rounds = len(calls) - prefill_calls
        return (written - prefill_calls - rounds) / (rounds * k), outs  # each round writes its kept drafts + 1

    results = {"k": k, "steps": args.steps, "prompts": args.prompts, "batch": args.batch, "budget": budget,
               "logits_max_abs_diff": diff, "rows": []}
    plain = padded(ours_b1("plain"))
    tokens = new_tokens(plain)
    correct = sum(toy_parity.answer_after_a(r) == a for r, a in zip(plain.tolist(), answers))
    print(f"pair trained {args.steps} steps; target's chain-of-thought accuracy on the test prompts "
          f"{correct}/{len(answers)}; logits max |ours - HF| {diff:.2e}; {tokens} tokens per pass\n")
    print("| compares | ours tokens/s | HF tokens/s | ours/HF | acceptance ours | acceptance HF |\n|---|---|---|---|---|---|")
    for kind in ("plain", "draft model", "prompt lookup"):
        rate, ours_out = acceptance(lambda: ours_b1(kind), target, len(singles)) if kind != "plain" else (None, ours_b1(kind))
        hf_rate, hf_out = acceptance(lambda: hf_b1(kind), hf_target, 0) if kind != "plain" else (None, hf_b1(kind))
        for name, outs in (("ours", ours_out), ("HF", hf_out)):
            if not torch.equal(padded(outs)[:, :plain.shape[1]], plain):
                raise AssertionError(f"{name} {kind} at batch 1 wrote other tokens than our plain greedy decoding")
        times = measure({"ours": lambda: ours_b1(kind), "hf": lambda: hf_b1(kind)}, "cpu", args.repeats)
        entry = {"metric": f"b=1 {kind}: ours vs HF", "ours_tokens_per_s": tokens / times["ours"],
                 "hf_tokens_per_s": tokens / times["hf"], "ratio": times["hf"] / times["ours"],
                 "acceptance_ours": rate, "acceptance_hf": hf_rate}
        results["rows"].append(entry)
        accept = "" if rate is None else f"{rate:.2f} | {hf_rate:.2f}"
        print(f"| {entry['metric']} | {entry['ours_tokens_per_s']:.0f} | {entry['hf_tokens_per_s']:.0f} | "
              f"{entry['ratio']:.2f}x | {accept or '- | -'} |", flush=True)
    plain_s = {}
    for batch in (1, args.batch):
        run = ours_b1 if batch == 1 else ours_batched
        kinds = ("plain", "draft model", "prompt lookup")
        if batch > 1:
            for kind in kinds:
                if not torch.equal(padded(run(kind))[:, :plain.shape[1]], plain):
                    raise AssertionError(f"ours {kind} at batch {batch} wrote other tokens than plain decoding")
        times = measure({kind: (lambda kind=kind: run(kind)) for kind in kinds}, "cpu", args.repeats)
        plain_s[batch] = times["plain"]
        for kind in kinds[1:]:
            entry = {"metric": f"b={batch} ours {kind} vs ours plain", "ours_tokens_per_s": tokens / times[kind],
                     "plain_tokens_per_s": tokens / times["plain"], "ratio": times["plain"] / times[kind]}
            results["rows"].append(entry)
            print(f"| {entry['metric']} | {entry['ours_tokens_per_s']:.0f} | (plain {entry['plain_tokens_per_s']:.0f}) "
                  f"| {entry['ratio']:.2f}x | | |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
