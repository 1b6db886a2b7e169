"""Accuracy on the built-in world's held-out split, beside what needs no looking.

The model's greedy answer is compared whole with the true one. Beside it, per task:
- chance: one over the number of possible answers;
- majority: the most frequent training answer to the same question (the task's most frequent
  answer when the question never occurs in training), a baseline that never looks or listens;
- blanked: the same model with every image, video frame and audio clip replaced by a blank
  (black, silent) one of the same size, so that the gap to accuracy is what the media add.
The answer to text_to_image ("draw a red circle in the top left") is a drawing: the first image
the model draws is scored by pixel analysis (`synthetic.describe`: object and cell), as
tests/models/test_image_generation.py scores it; a prompt has no media to blank. The answer to
say_and_draw is text then a drawing: right when the text is right and the drawing shows the object it
names (`synthetic.recognise`: colour and shape). Detection and segmentation answers are scored by box and mask
IoU (`locations.py`), beside the majority box and blanked images.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from polymodal.errors import InputError
from polymodal.data.collate import Collator
from polymodal.families.collators import make_collator
from polymodal.data.documents import Audio, Document, Segment
from polymodal.data.synthetic import DRAWN, LOCATION_TASKS, World, describe, recognise
from polymodal.data.tokenizer import Tokenizer
from polymodal.generation.engine import generate
from polymodal.evaluate.locations import LocationScore, location_table, score_locations
from polymodal.generation.prompts import prompts

MAJORITY_SAMPLES = 4000  # training examples per task the majority baseline counts


@dataclass
class TaskScore:
    task: str
    n: int
    correct: int
    chance: float
    majority: float | None = None  # accuracy of the most frequent training answer per question
    blanked: float | None = None  # the model's accuracy with blank media (None: no media, or not measured)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n


def answer(model: nn.Module, collator: Collator, tokenizer: Tokenizer, docs: list, max_new_tokens: int,
           sampling: dict | None = None) -> list[str]:
    """Greedy answers (or sampled: `generate`'s sampling options) to the prompts of `docs` (each document up to
    its first target)."""
    return [text for text, _ in written(model, collator, tokenizer, docs, max_new_tokens, images=False,
                                        sampling=sampling)]


def written(model: nn.Module, collator: Collator, tokenizer: Tokenizer, docs: list, max_new_tokens: int,
            images: bool = True, sampling: dict | None = None) -> list[tuple[str, Image.Image | None]]:
    """Each prompt's greedy answer: its text before any image it draws, and the first image (or None)."""
    batch, _ = prompts(collator, docs, max_new_tokens)
    out = generate(model, **batch, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id,
                   pad_token_id=tokenizer.pad_id, return_images=images, **(sampling or {}))
    tokens, drawings = (out.tokens, out.images) if images else (out, [[]] * len(out))
    begin = model.image_spans.begin if model.image_spans is not None else None
    texts = []
    for row in tokens.tolist():
        texts.append(tokenizer.text(row[:row.index(begin)] if begin in row else row).strip())
    return [(text, found[0] if found else None) for text, found in zip(texts, drawings)]


def drawn(model: nn.Module, collator: Collator, tokenizer: Tokenizer, docs: list, task: str,
          longest: int) -> list[str | None]:
    """What each prompt of `docs` gets, read from its drawing by pixel analysis: for text_to_image "a <colour>
    <shape> in the <cell>" (None: no image, or nothing in it); for say_and_draw the text it says, marked
    with what the drawing shows when that is another object."""
    length = model.image_spans.length
    if task == "text_to_image":
        return [describe(image) if image is not None else None
                for _, image in written(model, collator, tokenizer, docs, length + 3)]
    replies = []
    for text, image in written(model, collator, tokenizer, docs, longest + length + 4):
        seen = recognise(image) if image is not None else None
        replies.append(text if seen is not None and f"a {' '.join(seen)}" == text else f"{text} (drawn: {seen})")
    return replies


def blank(doc: Document) -> Document:
    """The document with every medium replaced by a black image / silent clip of the same size."""
    def empty(s: Segment) -> Segment:
        if s.kind == "image":
            return dataclasses.replace(s, media=Image.new("RGB", s.media.size))
        if s.kind == "video":
            return dataclasses.replace(s, media=[Image.new("RGB", f.size) for f in s.media])
        if s.kind == "audio":
            return dataclasses.replace(s, media=Audio(np.zeros_like(s.media.waveform), s.media.sample_rate))
        return s

    return dataclasses.replace(doc, segments=[empty(s) for s in doc.segments])


def majority(world: World, task: str, questions: list[str], n_train: int = MAJORITY_SAMPLES) -> list[str]:
    """The most frequent answer of the first n_train training examples to each question."""
    by_question: dict[str, Counter] = {}
    overall: Counter = Counter()
    for i in range(n_train):
        ex = world.sample(task, i, "train")
        by_question.setdefault(ex.document.texts[0], Counter())[ex.answer] += 1
        overall[ex.answer] += 1
    top = lambda c: c.most_common(1)[0][0]  # noqa: E731
    return [top(by_question[q]) if q in by_question else top(overall) for q in questions]


def sees(doc: Document) -> bool:
    """Does the prompt of `doc` hold media (so that blanking them is a baseline)?"""
    return any(s.kind != "text" for s in doc.segments if not s.target)


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Tokenizer, tasks: tuple[str, ...], n: int, world: World,
             batch_size: int = 64, baselines: bool = True, progress: Callable | None = None,
             start: int = 0) -> list[TaskScore | LocationScore]:
    """Scores on held-out examples start..start+n-1 of each task, with its baselines unless baselines=False.
    progress: called with (answers to write, task) per task, returns a `Progress` told of each batch."""
    drawing = [t for t in tasks if t in DRAWN]
    if drawing and (model.image_spans is None or model.image_spans.begin is None):
        raise InputError(f"task {drawing[0]} is scored on the images a model draws; {type(model).__name__} "
                         "draws none")
    collator = make_collator(model.config, tokenizer)
    scores = []
    for task in tasks:
        draws = task in DRAWN
        examples = [world.sample(task, start + i, "eval") for i in range(n)]
        longest = max(len(tokenizer.encode(c)) for c in world.choices(task))
        blanked = baselines and sees(examples[0].document)
        bar = progress(n * (1 + blanked), task) if progress is not None else None

        def replies(docs: list[Document], max_new_tokens: int = longest + 1) -> list[str | None]:
            out = []
            for i in range(0, n, batch_size):
                chunk = docs[i:i + batch_size]
                out += (drawn(model, collator, tokenizer, chunk, task, longest) if draws
                        else answer(model, collator, tokenizer, chunk, max_new_tokens))
                if bar is not None:
                    bar.update(len(chunk))
            return out

        if task in LOCATION_TASKS:
            scores.append(score_locations(replies, model, tokenizer, task, examples, world, blank if blanked else None))
            continue
        truth = [e.answer for e in examples]
        hits = lambda guesses: sum(g == t for g, t in zip(guesses, truth))  # noqa: E731
        docs = [e.document for e in examples]
        score = TaskScore(task, n, hits(replies(docs)), world.chance(task))
        if baselines:
            score.majority = hits(majority(world, task, [d.texts[0] for d in docs])) / n
            score.blanked = hits(replies([blank(d) for d in docs])) / n if blanked else None
        scores.append(score)
    return scores


def table(scores: list[TaskScore | LocationScore]) -> str:
    """accuracy beside the model with blank media, the majority answer and chance; then the location tasks'
    figures (`locations.location_table`)."""
    located = [s for s in scores if isinstance(s, LocationScore)]
    scores = [s for s in scores if not isinstance(s, LocationScore)]
    if located:
        return "\n\n".join(([table(scores)] if scores else []) + [location_table(located)])
    w = max([10, *(len(s.task) for s in scores)])  # video_direction is longer than the usual column
    rows = [f"{'task':<{w}} {'n':>5} {'accuracy':>9} {'blanked':>8} {'majority':>9} {'chance':>7}"]
    cell = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    rows += [f"{s.task:<{w}} {s.n:>5} {s.accuracy:>9.1%} {cell(s.blanked):>8} {cell(s.majority):>9} {s.chance:>7.1%}"
             for s in scores]
    return "\n".join(rows)
