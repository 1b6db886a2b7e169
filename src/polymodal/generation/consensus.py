"""Uncertainty-routed chain-of-thought (Gemini report, Gemini Team 2023, section 5.1.1): sample k chains of
thought per prompt; if the most common final answer reaches a share `threshold` of the k, answer it,
otherwise fall back to the greedy answer without chain of thought. The threshold is chosen on a
validation split to maximise accuracy (`select_threshold`).

All k chains of every prompt are one batched `generate` call (each prompt repeated k times); the final
answer of a chain is the caller's rule, `extract(tokens) -> answer or None`, on the chain's new tokens.
A chain whose answer cannot be extracted counts against the consensus.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from polymodal.errors import InputError
from polymodal.generation.engine import generate


@dataclass
class Votes:
    majority: list[Hashable | None]  # per prompt, the most common extracted answer (None: no chain gave one)
    share: list[float]  # its count over k


@dataclass
class Routed:
    answers: list[Hashable | None]
    routes: list[str]  # per prompt: "consensus" or "greedy"
    votes: Votes
    greedy: list[Hashable | None]  # the greedy answers, None where the consensus route made them unneeded


def rows_repeated(inputs: dict, batch: int, k: int) -> dict:
    """Each model input that holds one entry per prompt (first dim == batch), repeated k times in place."""
    out = {}
    for name, value in inputs.items():
        if value is None:
            continue
        if value.shape[0] != batch:
            raise InputError(f"{name} has {value.shape[0]} entries for {batch} prompts: chains repeat each prompt's "
                             "inputs, so every input needs one entry per prompt (one image per prompt)")
        out[name] = value.repeat_interleave(k, dim=0)
    return out


def vote(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
         extract: Callable[[list[int]], Hashable | None], k: int = 8, max_new_tokens: int = 64,
         temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
         eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None, **model_inputs) -> Votes:
    """k sampled chains per prompt (one batched generate) and the consensus of their extracted answers."""
    if k < 1:
        raise InputError(f"k (chains per prompt) must be >= 1, got {k}")
    B = input_ids.shape[0]
    chains = generate(model, **rows_repeated(dict(input_ids=input_ids, attention_mask=attention_mask,
                                                  **model_inputs), B, k),
                      max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    majority, share = [], []
    for b in range(B):
        answers = [extract(row) for row in chains[b * k:(b + 1) * k].tolist()]
        counts = Counter(a for a in answers if a is not None)
        best, n = counts.most_common(1)[0] if counts else (None, 0)
        majority.append(best)
        share.append(n / k)
    return Votes(majority, share)


def route(votes: Votes, greedy: Sequence[Hashable | None], threshold: float) -> tuple[list, list[str]]:
    """Per prompt: the majority answer where its share reaches threshold, else the greedy one; and the route."""
    routes = ["consensus" if s >= threshold else "greedy" for s in votes.share]
    answers = [m if r == "consensus" else g for m, g, r in zip(votes.majority, greedy, routes)]
    return answers, routes


def uncertainty_routed(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       extract: Callable[[list[int]], Hashable | None], threshold: float, k: int = 8,
                       direct_input_ids: torch.Tensor | None = None, direct_attention_mask: torch.Tensor | None = None,
                       extract_direct: Callable[[list[int]], Hashable | None] | None = None,
                       direct_model_inputs: dict | None = None, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, seed: int | None = None,
                       eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                       **model_inputs) -> Routed:
    """input_ids: the prompts asking for a chain of thought; direct_input_ids (default: the same prompts) those
    answered greedily without one, for the prompts whose consensus falls short of threshold; extract_direct
    (default: extract) reads their answers. direct_model_inputs (default: model_inputs) are the direct prompts'
    other inputs, all of them, when they differ from the chains' (per-token inputs such as token_type_ids follow the tokens)."""
    if not 0.0 <= threshold <= 1.0 + 1e-9 and threshold != float("inf"):
        raise InputError(f"threshold is a share of the k chains, in [0, 1] (or inf: always greedy), got {threshold}")
    stop = dict(eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    votes = vote(model, input_ids, attention_mask, extract=extract, k=k, max_new_tokens=max_new_tokens,
                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **stop, **model_inputs)
    greedy: list[Hashable | None] = [None] * input_ids.shape[0]
    unsure = [b for b, s in enumerate(votes.share) if s < threshold]
    if unsure:
        ids, am = (input_ids, attention_mask) if direct_input_ids is None else (direct_input_ids, direct_attention_mask)
        pick = torch.tensor(unsure, device=ids.device)
        inputs = model_inputs if direct_model_inputs is None else direct_model_inputs
        rows = {name: v.index_select(0, pick.to(v.device)) for name, v in inputs.items() if v is not None}
        new = generate(model, ids.index_select(0, pick), None if am is None else am.index_select(0, pick),
                       max_new_tokens=max_new_tokens, **stop, **rows)
        for b, row in zip(unsure, new.tolist()):
            greedy[b] = (extract_direct or extract)(row)
    answers, routes = route(votes, greedy, threshold)
    return Routed(answers, routes, votes, greedy)


def select_threshold(votes: Votes, greedy: Sequence[Hashable | None], truth: Sequence[Hashable]) -> tuple[float, float]:
    """The threshold that maximises accuracy on a validation split (the smallest of equals), and that accuracy.
    Candidates: every share seen, and inf (always greedy)."""
    if not len(votes.share) == len(greedy) == len(truth):
        raise InputError(f"votes ({len(votes.share)}), greedy answers ({len(greedy)}) and truths ({len(truth)}) "
                         "must cover the same prompts")
    best = (float("inf"), -1.0)
    for threshold in sorted({*votes.share, float("inf")}):
        answers, _ = route(votes, greedy, threshold)
        accuracy = sum(a == t for a, t in zip(answers, truth)) / len(truth)
        if accuracy > best[1]:
            best = (threshold, accuracy)
    return best
