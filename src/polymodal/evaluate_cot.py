"""Uncertainty-routed chain-of-thought (Gemini report, section 5.1.1) scored on the built-in world's held-out split.

A task asked with a chain of thought (`synthetic.COT_TASKS`: "are there more red than blue shapes? count first"
-> "two and one, so yes") is scored beside the same question asked directly, on the same held-out images:
- greedy: the direct question, answered greedily without a chain;
- CoT greedy: the final answer of the greedy chain;
- CoT majority: the most common final answer of k sampled chains (`consensus.vote`, one batched generate);
- routed: that majority where its share of the k reaches a threshold, else the greedy answer; the threshold
  maximises accuracy on a validation split: eval examples VALIDATION_START on, held out from training like
  the test examples 0..n-1 and disjoint from them (tests/data/test_held_out.py);
and evaluate.py's baselines for the direct question: blanked images, the majority training answer, chance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.data.collate import Collator
from polymodal.data.synthetic import COT_TASKS, World, asked_directly, final_answer
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import InputError
from polymodal.evaluate import answer, blank, majority
from polymodal.families.collators import make_collator
from polymodal.generation.consensus import Votes, route, select_threshold, vote
from polymodal.generation.prompts import prompts

VALIDATION_START = 100_000  # the validation split's first eval index; the test split is 0..n-1


@dataclass
class Split:
    truth: list[str]
    greedy: list[str]
    cot_greedy: list[str | None]
    votes: Votes


@dataclass
class RoutingScore:
    task: str
    n: int
    k: int
    greedy: float  # direct question, no chain
    cot_greedy: float
    cot_majority: float
    routed: float
    threshold: float  # chosen on the validation split
    validation: int  # its size
    routed_to_greedy: float  # share of test questions the threshold sent to the greedy answer
    blanked: float  # greedy on the direct question with black images
    majority: float  # the most frequent training answer to the direct question
    chance: float
    test: Split  # per test question: the truth, the greedy and CoT answers, the votes
    routes: list[str]  # per test question: "consensus" or "greedy"


def answers(model: nn.Module, collator: Collator, tokenizer: Tokenizer, docs: list, max_new_tokens: int,
            batch_size: int) -> list[str]:
    return [a for i in range(0, len(docs), batch_size)
            for a in answer(model, collator, tokenizer, docs[i:i + batch_size], max_new_tokens)]


def chains(model: nn.Module, collator: Collator, tokenizer: Tokenizer, docs: list, *, k: int, temperature: float,
           seed: int, max_new_tokens: int, batch_size: int) -> Votes:
    """k sampled chains per prompt of docs and the consensus of their final answers."""
    extract = lambda row: final_answer(tokenizer.text(row))  # noqa: E731
    majority_answers, share = [], []
    for i in range(0, len(docs), batch_size):
        v = vote(model, **prompts(collator, docs[i:i + batch_size], max_new_tokens)[0], extract=extract, k=k, temperature=temperature,
                 seed=seed + i, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id,
                 pad_token_id=tokenizer.pad_id)
        majority_answers += v.majority
        share += v.share
    return Votes(majority_answers, share)


def longest(tokenizer: Tokenizer, world: World, task: str) -> int:
    return max(len(tokenizer.encode(c)) for c in world.choices(task)) + 1


@torch.no_grad()
def evaluate_routing(model: nn.Module, tokenizer: Tokenizer, task: str, n: int, world: World, *, k: int = 8,
                     validation: int = 100, temperature: float = 1.0, batch_size: int = 64) -> RoutingScore:
    """The four answers to the first n held-out examples of `task` (one of COT_TASKS), and the baselines."""
    if not 1 <= n <= VALIDATION_START:  # the validation split starts there: the two never share a question
        raise InputError(f"n must be in [1, {VALIDATION_START}] (validation questions start at eval example "
                         f"{VALIDATION_START}), got {n}")
    if task not in COT_TASKS:
        raise InputError(f"task {task!r} has no chain-of-thought form; tasks with one: {', '.join(COT_TASKS)}")
    collator = make_collator(model.config, tokenizer)
    direct_task = COT_TASKS[task]
    chain_tokens, direct_tokens = longest(tokenizer, world, task), longest(tokenizer, world, direct_task)
    splits = {}
    for name, start, size, seed in (("test", 0, n, 0), ("validation", VALIDATION_START, validation, 1)):
        cot = [world.sample(task, start + i, "eval").document for i in range(size)]
        direct = [asked_directly(world.sample(task, start + i, "eval")) for i in range(size)]
        cot_greedy = answers(model, collator, tokenizer, cot, chain_tokens, batch_size)
        splits[name] = Split(truth=[e.answer for e in direct],
                             greedy=answers(model, collator, tokenizer, [e.document for e in direct], direct_tokens,
                                            batch_size),
                             cot_greedy=[final_answer(c) for c in cot_greedy],
                             votes=chains(model, collator, tokenizer, cot, k=k, temperature=temperature,
                                          seed=seed * 1_000_000, max_new_tokens=chain_tokens, batch_size=batch_size))
        if name == "test":
            questions = [e.document.texts[0] for e in direct]
            blanked = answers(model, collator, tokenizer, [blank(e.document) for e in direct], direct_tokens,
                              batch_size)
    val, test = splits["validation"], splits["test"]
    threshold, _ = select_threshold(val.votes, val.greedy, val.truth)
    routed, routes = route(test.votes, test.greedy, threshold)
    accuracy = lambda guesses: sum(g == t for g, t in zip(guesses, test.truth)) / n  # noqa: E731
    return RoutingScore(task, n, k, accuracy(test.greedy), accuracy(test.cot_greedy), accuracy(test.votes.majority),
                        accuracy(routed), threshold, validation, routes.count("greedy") / n, accuracy(blanked),
                        accuracy(majority(world, direct_task, questions)), world.chance(direct_task), test, routes)


def routing_table(scores: list[RoutingScore]) -> str:
    """The four answers side by side, the baselines, and the threshold each row's routing used."""
    w = max([12, *(len(s.task) for s in scores)])
    k = scores[0].k
    rows = [f"{'task':<{w}} {'n':>5} {'greedy':>7} {'CoT greedy':>11} {f'CoT maj@{k}':>10} {'routed':>7} "
            f"{'blanked':>8} {'majority':>9} {'chance':>7}"]
    for s in scores:
        rows.append(f"{s.task:<{w}} {s.n:>5} {s.greedy:>7.1%} {s.cot_greedy:>11.1%} {s.cot_majority:>10.1%} "
                    f"{s.routed:>7.1%} {s.blanked:>8.1%} {s.majority:>9.1%} {s.chance:>7.1%}")
    rows += [f"{s.task}: threshold {s.threshold:.3f} (share of {s.k} chains) chosen on {s.validation} validation "
             f"questions (eval examples {VALIDATION_START}+); {s.routed_to_greedy:.1%} of test questions routed to greedy"
             for s in scores]
    return "\n".join(rows)
