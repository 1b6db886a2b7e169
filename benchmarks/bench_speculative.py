"""Speculative decoding beside our plain decoding and HF transformers' assisted generation, on a trained pair.

The pair (`toy_pair.py`: a 6-layer target and a 1-layer draft, each trained to convergence on a digit code
and kept in --models) is written as HF Llama checkpoints with the production converter; HF loads them,
so both libraries run the same weights (their logits are compared first). Greedy decoding of the test split's
prompts, every call with the same stop token (<eos>, which ends every answer) and the same budget, eager on
both sides:

- batch 1 (what HF's assisted generation supports), prompt after prompt, ours vs HF: plain greedy, a draft
  model (HF `assistant_model`, k tokens per round, HF's constant schedule with its confidence early stop off
  so it also drafts k), prompt lookup (`prompt_lookup_num_tokens`, n-grams up to 2 on both);
- ours speculative vs ours plain, at batch 1 and at batch --batch (left-padded rows that stop apart).

Every output is checked equal to our plain greedy tokens. Tokens per target forward (the prefill included,
1.0 for plain decoding, at most k + 1): what drafting buys, counted the same way on both sides from the
target's forward calls and the tokens written up to each stop token. The share of drafts the target kept is
reported from the draft's own greedy answers: where they equal the target's, every draft before the stop
token is kept.

    python benchmarks/bench_speculative.py            # trains the pair once (a few CPU minutes), then measures
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

import polymodal as pm
import toy_pair  # benchmarks/toy_pair.py, beside this script
from polymodal.convert.hf import save_hf
from timing import measure

KINDS = ("plain", "draft model", "prompt lookup")


def counted(model: torch.nn.Module):
    """A list that grows by one on every forward of model, and the hook to remove."""
    calls = []
    return calls, model.register_forward_hook(lambda *_: calls.append(1))


def new_tokens(rows: torch.Tensor) -> int:
    """Tokens written up to and including each row's stop token."""
    return sum(r.index(toy_pair.EOS) + 1 if toy_pair.EOS in r else len(r) for r in rows.tolist())


def padded(outs: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(list(outs), batch_first=True, padding_value=toy_pair.EOS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=3000, help="training step limit of each model (default: %(default)s)")
    p.add_argument("--k", type=int, default=4, help="tokens drafted per round (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="benchmarks/results/toy_pair", help="where the trained pair is kept")
    p.add_argument("--out", default="benchmarks/results/speculative.json")
    args = p.parse_args()
    torch.manual_seed(0)
    target, draft, logs = toy_pair.trained_pair(Path(args.models), args.max_steps)
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("target", target), ("draft", draft)):
            save_hf(model, Path(tmp) / name, "llama")
        hf_target = LlamaForCausalLM.from_pretrained(Path(tmp) / "target").eval()
        hf_draft = LlamaForCausalLM.from_pretrained(Path(tmp) / "draft").eval()
    rows, _ = toy_pair.prompts(2, args.prompts)
    singles = [torch.tensor([r]) for r in rows]
    with torch.no_grad():
        diff = max((target(ids).logits - hf_target(input_ids=ids).logits).abs().max().item() for ids in singles)
    k, eos = args.k, toy_pair.EOS
    stop = dict(max_new_tokens=toy_pair.DIGITS + 1, eos_token_id=eos, pad_token_id=eos)  # the answer and <eos>
    drafting = {"plain": {}, "draft model": dict(assistant_model=draft, num_assistant_tokens=k),
                "prompt lookup": dict(prompt_lookup_num_tokens=k)}
    # HF reads the drafting schedule from the assistant's own generation config, not from generate's arguments
    hf_draft.generation_config.update(num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                                      assistant_confidence_threshold=0.0)
    hf_drafting = {"plain": {}, "draft model": dict(assistant_model=hf_draft),
                   "prompt lookup": dict(prompt_lookup_num_tokens=k)}
    batches = [toy_pair.left_padded(rows[i:i + args.batch]) for i in range(0, len(rows), args.batch)]

    def ours(kind: str, batch: int) -> list[torch.Tensor]:
        if batch == 1:
            return [pm.generate(target, ids, **stop, **drafting[kind])[0] for ids in singles]
        return [row for ids, am in batches for row in pm.generate(target, ids, am, **stop, **drafting[kind])]

    def hf(kind: str) -> list[torch.Tensor]:
        return [hf_target.generate(input_ids=ids, do_sample=False, **stop, **hf_drafting[kind])[0, ids.shape[1]:]
                for ids in singles]

    def per_forward(fn, model) -> float:
        calls, hook = counted(model)
        written = new_tokens(padded(fn()))
        hook.remove()
        return written / len(calls)

    plain = padded(ours("plain", 1))
    tokens = new_tokens(plain)
    for name, fn in [(f"ours {kind} b={b}", lambda kind=kind, b=b: ours(kind, b)) for kind in KINDS for b in (1, args.batch)] + \
                    [(f"HF {kind}", lambda kind=kind: hf(kind)) for kind in KINDS]:
        if not torch.equal(padded(fn())[:, :plain.shape[1]], plain):
            raise AssertionError(f"{name} wrote other tokens than our plain greedy decoding at batch 1")
    with torch.no_grad():
        accuracy = {name: toy_pair.answer_accuracy(model, 2, args.prompts) for name, model in
                    (("target", target), ("draft", draft))}
    results = {"k": k, "prompts": args.prompts, "batch": args.batch, "training": logs, "test_answer_accuracy": accuracy,
               "logits_max_abs_diff": diff, "tokens_per_pass": tokens, "rows": []}
    print(f"target: {logs['target']['steps']} steps ({logs['target']['seconds']:.0f} s), draft: "
          f"{logs['draft']['steps']} steps ({logs['draft']['seconds']:.0f} s); greedy answers right on the "
          f"{args.prompts} test prompts: target {accuracy['target']:.0%}, draft {accuracy['draft']:.0%}; logits "
          f"max |ours - HF| {diff:.1e}; {tokens} tokens per pass, every output equal to our plain greedy tokens\n")
    print("| compares (greedy, eager, same stop token) | ours tokens/s | other tokens/s | speedup | tokens per target "
          "forward, ours | the same, HF |\n|---|---|---|---|---|---|")
    for kind in KINDS:
        rate = hf_rate = None
        if kind != "plain":
            rate = per_forward(functools.partial(ours, kind, 1), target)
            hf_rate = per_forward(functools.partial(hf, kind), hf_target)
        times = measure({"ours": lambda: ours(kind, 1), "hf": lambda: hf(kind)}, "cpu", args.repeats)
        row(results, f"b=1 {kind}: ours vs HF {'assisted generation' if rate is not None else 'greedy'}",
            tokens / times["ours"], tokens / times["hf"], rate, hf_rate)
    for batch in (1, args.batch):
        times = measure({kind: (lambda kind=kind: ours(kind, batch)) for kind in KINDS}, "cpu", args.repeats)
        for kind in KINDS[1:]:  # a batch's forward writes several rows' tokens: counted at batch 1 only
            rate = per_forward(functools.partial(ours, kind, 1), target) if batch == 1 else None
            row(results, f"b={batch} ours {kind} vs ours plain", tokens / times[kind], tokens / times["plain"], rate)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def row(results: dict, metric: str, ours_tps: float, other_tps: float, rate: float | None,
        hf_rate: float | None = None) -> None:
    results["rows"].append({"metric": metric, "ours_tokens_per_s": ours_tps, "other_tokens_per_s": other_tps,
                            "speedup": ours_tps / other_tps, "tokens_per_target_forward_ours": rate, "tokens_per_target_forward_hf": hf_rate})
    cell = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"| {metric} | {ours_tps:.0f} | {other_tps:.0f} | {ours_tps / other_tps:.2f}x | {cell(rate)} | "
          f"{cell(hf_rate)} |", flush=True)


if __name__ == "__main__":
    main()
