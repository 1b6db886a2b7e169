"""Accuracy on the built-in world's held-out split: the model's greedy answer, compared whole
with the true one. Chance is one over the number of possible answers of the task. The answer to
text_to_image ("draw a red circle") is a drawing: the first image the model draws is scored by
pixel analysis (`synthetic.recognise`), as tests/models/test_image_generation.py scores it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.data.collate import Collator
from polymodal.data.synthetic import World, recognise
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


def drawn(model: nn.Module, collator: Collator, tokenizer: Tokenizer, docs: list) -> list[str | None]:
    """What the first image drawn for each prompt of `docs` shows, as "a <colour> <shape>" (None: no image)."""
    out = generate(model, **collator.prompts(docs), max_new_tokens=model.image_spans.length + 3,
                   eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, return_images=True)
    seen = [recognise(images[0]) if images else None for images in out.images]
    return [None if s is None else f"a {s[0]} {s[1]}" for s in seen]


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Tokenizer, tasks: tuple[str, ...], n: int, world: World,
             batch_size: int = 64) -> list[TaskScore]:
    """Scores on the first n held-out examples of each task."""
    if "text_to_image" in tasks and getattr(getattr(model, "image_spans", None), "begin", None) is None:
        raise ValueError(f"task text_to_image is scored on the images a model draws; {type(model).__name__} "
                         "draws none")
    collator = Collator(model.config, tokenizer)
    scores = []
    for task in tasks:
        draws = task == "text_to_image"
        examples = [world.sample(task, i, "eval") for i in range(n)]
        longest = max(len(tokenizer.encode(c)) for c in world.choices(task))
        correct = 0
        for i in range(0, n, batch_size):
            chunk = examples[i:i + batch_size]
            docs = [e.document for e in chunk]
            replies = (drawn(model, collator, tokenizer, docs) if draws
                       else answer(model, collator, tokenizer, docs, longest + 1))
            correct += sum(r == e.answer for r, e in zip(replies, chunk))
        scores.append(TaskScore(task, n, correct, world.chance(task)))
    return scores


def table(scores: list[TaskScore]) -> str:
    w = max([10, *(len(s.task) for s in scores)])  # video_direction is longer than the usual column
    rows = [f"{'task':<{w}} {'n':>5} {'accuracy':>9} {'chance':>7}"]
    rows += [f"{s.task:<{w}} {s.n:>5} {s.accuracy:>9.1%} {s.chance:>7.1%}" for s in scores]
    return "\n".join(rows)
