"""Evaluation hooks: what the trainer measures at each eval besides its eval loss.

A hook is any object with
    metrics: tuple[str, ...]                               the names its call returns, known before training
    __call__(model, tokenizer) -> dict[str, float]         those metrics for the model as it is now
The trainer calls each hook on the main process of a single-process run (generation on a model sharded over
processes is not collective-safe), with the model in eval mode and no gradients, and writes the metrics into
metrics.jsonl beside the eval loss. `--keep-best METRIC` keeps the checkpoint with the best value of one of
them: a name ending in "loss" is best lowest, any other best highest. A hook must not draw from the global
random streams (greedy decoding does not), so that a resumed run stays exact.

`EvalLoss` is the trainer's own (every process takes part: FSDP needs them all); `WorldAccuracy` is the
built-in world's: greedy answers to held-out questions, per task and their mean.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from polymodal.data.collate import Collator, count_targets
from polymodal.data.documents import Document
from polymodal.data.synthetic import WORLD
from polymodal.data.tokenizer import Tokenizer
from polymodal.evaluate_cot import VALIDATION_START
from polymodal.retrieval import scorer


class EvalHook(Protocol):
    metrics: tuple[str, ...]

    def __call__(self, model: nn.Module, tokenizer: Tokenizer) -> dict[str, float]: ...


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere: how the trainer runs the model."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@dataclass
class EvalLoss:
    """"eval_loss": the mean loss per target token over `docs`."""
    docs: list[Document]
    collator: Collator
    batch_size: int
    pack: bool
    device: torch.device
    metrics: tuple[str, ...] = ("eval_loss",)

    @torch.no_grad()
    def __call__(self, model: nn.Module, tokenizer: Tokenizer) -> dict[str, float]:
        total = n = 0.0
        with autocast(self.device):
            for i in range(0, len(self.docs), self.batch_size):
                batch = self.collator(self.docs[i:i + self.batch_size], pack=self.pack)
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                k = count_targets(batch)
                total, n = total + model(**batch).loss.item() * k, n + k
        return {"eval_loss": total / n}


@dataclass
class WorldAccuracy:
    """Accuracy on n held-out questions per task of the built-in world: "accuracy/<task>" each and "accuracy",
    their mean. The questions are the eval split's validation examples (from VALIDATION_START on), apart from
    the test examples 0..n-1 that `polymodal eval` scores, so keeping the best checkpoint by them does not
    choose it on the figures reported."""

    tasks: tuple[str, ...]
    n: int = 64
    start: int = VALIDATION_START
    metrics: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        self.metrics = ("accuracy", *(f"accuracy/{t}" for t in self.tasks))

    @torch.no_grad()
    def __call__(self, model: nn.Module, tokenizer: Tokenizer) -> dict[str, float]:
        scores = scorer(model)(model, tokenizer, self.tasks, self.n, WORLD, baselines=False, start=self.start)
        per_task = {f"accuracy/{s.task}": s.accuracy for s in scores}
        return {"accuracy": sum(per_task.values()) / len(per_task), **per_task}
