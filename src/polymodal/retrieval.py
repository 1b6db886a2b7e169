"""Image -> caption retrieval accuracy of a CLIP / SigLIP dual encoder on the built-in world's held-out
split, beside what needs no looking (as `evaluate.py` scores the generative families).

Each held-out image of a task is matched against every possible answer of that task (CLIP's zero-shot
classification: the caption task's "a red circle", ..., the colour task's "red", ...); it is right when
its true answer scores highest. Beside it: chance (one over the number of answers), the majority
answer (`evaluate.majority`, which never looks) and the same model on blank images.
"""

from __future__ import annotations

from torch import nn

from polymodal.families.collators import make_collator
from polymodal.families.contrastive.format import PairCollator
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.evaluate import TaskScore, blank, evaluate, majority
from polymodal.evaluate.user_data import similarities
from polymodal.families import spec_of


def retrieve(model: nn.Module, collator: PairCollator, docs: list, answers: tuple[str, ...],
             batch_size: int) -> list[str]:
    """The answer whose caption embedding is nearest each document's image."""
    return [answers[j] for j in similarities(model, collator, docs, answers, batch_size).argmax(1).tolist()]


def score_retrieval(model: nn.Module, tokenizer: Tokenizer, tasks: tuple[str, ...], n: int, world: World,
                    batch_size: int = 64, baselines: bool = True, progress=None, start: int = 0) -> list[TaskScore]:
    """Retrieval accuracy on held-out examples start..start+n-1 of each task, with its baselines unless
    baselines=False; progress as in `evaluate.evaluate`."""
    was_training = model.training
    model.eval()
    collator = make_collator(model.config, tokenizer)
    scores = []
    for task in tasks:
        examples = [world.sample(task, start + i, "eval") for i in range(n)]
        docs, truth, answers = [e.document for e in examples], [e.answer for e in examples], world.choices(task)
        hits = lambda guesses: sum(g == t for g, t in zip(guesses, truth))  # noqa: E731
        bar = progress(n * (1 + baselines), task) if progress is not None else None
        score = TaskScore(task, n, hits(retrieve(model, collator, docs, answers, batch_size)), world.chance(task))
        if bar is not None:
            bar.update(n)
        if baselines:
            score.majority = hits(majority(world, task, [d.texts[0] for d in docs])) / n
            score.blanked = hits(retrieve(model, collator, [blank(d) for d in docs], answers, batch_size)) / n
            if bar is not None:
                bar.update(n)
        scores.append(score)
    model.train(was_training)
    return scores


def scorer(model: nn.Module):
    """The held-out scoring that fits the model: retrieval for a dual encoder, greedy answers otherwise."""
    return score_retrieval if spec_of(model).pairs else evaluate
