"""Uncertainty-routed chain-of-thought on the toy running-parity task (`toy_parity.py`): accuracy of greedy
answers without a chain, greedy with a chain, the majority of k sampled chains, and the routed answer
(majority where its share reaches a threshold chosen on the validation split, else greedy without a
chain), on the test split, beside chance (50%).

    python benchmarks/cot_routing.py          # uses (or trains) the target of bench_speculative.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import polymodal as pm
import toy_parity  # benchmarks/toy_parity.py, beside this script
from polymodal.generation.consensus import Votes, route, select_threshold, vote


def greedy_answers(model, prompts: list[list[int]], batch: int = 256) -> list[int | None]:
    out = []
    for i in range(0, len(prompts), batch):
        ids, am = toy_parity.left_padded(prompts[i:i + batch])
        new = pm.generate(model, ids, am, max_new_tokens=24, eos_token_id=toy_parity.EOS)
        out += [toy_parity.answer_after_a(r) for r in new.tolist()]
    return out


def votes(model, prompts: list[list[int]], k: int, temperature: float, seed: int, batch: int = 64) -> Votes:
    majority, share = [], []
    for i in range(0, len(prompts), batch):
        ids, am = toy_parity.left_padded(prompts[i:i + batch])
        v = vote(model, ids, am, extract=toy_parity.answer_after_a, k=k, max_new_tokens=24, temperature=temperature,
                 seed=seed + i, eos_token_id=toy_parity.EOS)
        majority += v.majority
        share += v.share
    return Votes(majority, share)


def accuracy(answers, truth) -> float:
    return sum(a == t for a, t in zip(answers, truth)) / len(truth)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="the target's training steps (default: %(default)s)")
    p.add_argument("--k", type=int, default=8, help="chains per prompt (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--validation", type=int, default=300)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--models", default="benchmarks/results/toy_parity")
    p.add_argument("--out", default="benchmarks/results/cot_routing.json")
    args = p.parse_args()
    torch.manual_seed(0)
    model, _ = toy_parity.trained_pair(Path(args.models), args.steps)
    splits = {}
    for name, split, n in (("validation", 1, args.validation), ("test", 2, args.test)):
        cot, truth = toy_parity.prompts(split, n, cot=True)
        direct, _ = toy_parity.prompts(split, n, cot=False)
        splits[name] = dict(truth=truth, direct=greedy_answers(model, direct), cot=greedy_answers(model, cot),
                            votes=votes(model, cot, args.k, args.temperature, seed=split * 100_000))
    val = splits["validation"]
    threshold, val_accuracy = select_threshold(val["votes"], val["direct"], val["truth"])
    test = splits["test"]
    routed, routes = route(test["votes"], test["direct"], threshold)
    rows = [("greedy, no chain of thought", accuracy(test["direct"], test["truth"])),
            ("greedy chain of thought", accuracy(test["cot"], test["truth"])),
            (f"majority of {args.k} sampled chains (T={args.temperature})",
             accuracy(test["votes"].majority, test["truth"])),
            (f"uncertainty-routed (threshold {threshold:.3f} from validation)", accuracy(routed, test["truth"])),
            ("chance", toy_parity.CHANCE)]
    greedy_share = routes.count("greedy") / len(routes)
    print(f"| method (test split, {args.test} questions) | accuracy |\n|---|---|")
    for name, acc in rows:
        print(f"| {name} | {acc:.1%} |")
    print(f"\nrouted to greedy: {greedy_share:.1%} of test questions; validation accuracy at the threshold "
          f"{val_accuracy:.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threshold": threshold, "routed_to_greedy": greedy_share,
                                          "rows": dict(rows), "k": args.k, "steps": args.steps}, indent=2) + "\n")


if __name__ == "__main__":
    main()
