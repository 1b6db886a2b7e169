"""Accuracy on the built-in world's held-out split: the model's greedy answer, compared whole
with the true one. Chance is one over the number of possible answers of the task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.data.collate import Collator
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.generation.engine import generate


@dataclass
class TaskScore:
    task: str
    n: int
    correct: int
    chance: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.n


def answer(model: nn.Module, collator: Collator, tokenizer: Tokenizer, docs: list, max_new_tokens: int) -> list[str]:
    """Greedy answers to the prompts of `docs` (each document up to its first target)."""
    batch = collator.prompts(docs)
    new = generate(model, **batch, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id,
                   pad_token_id=tokenizer.pad_id)
    return [tokenizer.decode(row).strip() for row in new.tolist()]


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Tokenizer, tasks: tuple[str, ...], n: int, world: World,
             batch_size: int = 64) -> list[TaskScore]:
    """Scores on the first n held-out examples of each task."""
    collator = Collator(model.config, tokenizer)
    scores = []
    for task in tasks:
        examples = [world.sample(task, i, "eval") for i in range(n)]
        longest = max(len(tokenizer.encode(c)) for c in world.choices(task))
        correct = 0
        for i in range(0, n, batch_size):
            chunk = examples[i:i + batch_size]
            replies = answer(model, collator, tokenizer, [e.document for e in chunk], longest + 1)
            correct += sum(r == e.answer for r, e in zip(replies, chunk))
        scores.append(TaskScore(task, n, correct, world.chance(task)))
    return scores


def table(scores: list[TaskScore]) -> str:
    rows = [f"{'task':<10} {'n':>5} {'accuracy':>9} {'chance':>7}"]
    rows += [f"{s.task:<10} {s.n:>5} {s.accuracy:>9.1%} {s.chance:>7.1%}" for s in scores]
    return "\n".join(rows)
