"""A model scored on the user's own documents (`polymodal eval RUN --data FILE`), beside what needs no looking.

Every target text segment of a document is one question: the model is given the document up to that segment
(earlier targets included, as context) and writes an answer, greedy or sampled, in batches; the answer is
scored against the segment's references (its `references` list, else its own text) with one of `metrics.METRICS`.
A dual encoder (CLIP, SigLIP) writes nothing: each document's image is matched against the captions of every
document of the file (its references count as its captions), scored by recall@k both ways.
Targets that are objects (boxes, masks) are scored as places instead (`--metric boxes`, `user_locations.py`).
Beside the model, with the same metric:
- blanked: the same model with every image, video frame and audio clip of the prompt blank (`world.blank`);
- majority: the most frequent answer of the run's training file to the same question text (else to the
  same task, else overall), when the run was trained on a file.
Figures are given for the whole file and, when documents carry a `task`, per task.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from polymodal.families.collators import make_collator
from polymodal.data.documents import Document, with_media
from polymodal.data.readers import read_flagged
from polymodal.data.formats import caption
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import DocumentError
from polymodal.encoders.mask_vae import mask_vae_of
from polymodal.evaluate.metrics import METRICS
from polymodal.evaluate.user_locations import (answer_tokens, check_objects, check_targets, majority as majority_box,
                                               score_objects)
from polymodal.evaluate.world import answer, blank
from polymodal.families import spec_of

RECALL_AT = (1, 5, 10)
MARKERS = {"image": "<image>", "audio": "<audio>", "video": "<video>"}


@dataclass
class Item:
    """One target text of one document: what the model is given, and what its answer is scored against."""
    id: str
    task: str | None
    prompt: Document  # the document up to the target, the target marked (so the collator's prompt stops there)
    answer: str  # what training teaches: the target's text (a dual encoder: the caption)
    references: list[str]
    question: str = ""  # the prompt's text, which the majority baseline answers (a dual encoder's: none)

    @property
    def text(self) -> str:
        """The prompt as text, media shown as <image>, <audio>, <video> (a dual encoder's: its image)."""
        shown = [s for s in self.prompt.segments if s.kind != "text" or (self.question and not s.target)]
        return " ".join(s.text if s.kind == "text" else MARKERS[s.kind] for s in shown)


def read_documents(path: str | Path, flag: str = "--data") -> Sequence[Document]:
    """The documents of the user's data (any format `data.readers` reads), media unread: each batch loads its own."""
    return read_flagged(flag, path)


def items(docs: list[Document], source: str | Path, pairs: bool = False, required: bool = True) -> list[Item]:
    """The questions of `docs`: one per target text segment (per document for a dual encoder, its caption).
    required: a document with nothing to score is an error naming its line (else it is skipped)."""
    out = []
    for i, doc in enumerate(docs):
        name = doc.id if doc.id is not None else f"line {doc.line or i + 1}"
        if pairs:
            refs = [r for s in doc.segments if s.target and s.references for r in s.references]
            out.append(Item(name, doc.task, doc, caption(doc), refs or [caption(doc)]))
            continue
        targets = [j for j, s in enumerate(doc.segments) if s.target and s.kind == "text"]
        if not targets and required:
            raise DocumentError(f"{source}, {name}: no target text segment to score; mark the answer with "
                                '"target": true')
        for k, j in enumerate(targets):
            segments = [dataclasses.replace(s, target=False) for s in doc.segments[:j]] + [doc.segments[j]]
            target = doc.segments[j]
            out.append(Item(name if len(targets) == 1 else f"{name}#{k + 1}", doc.task,
                            dataclasses.replace(doc, segments=segments), target.text,
                            target.references or [target.text], " ".join(s.text for s in segments[:-1] if s.text)))
    return out


def check(collator, questions: list[Item], source: str | Path, pairs: bool, objects: bool = False) -> None:
    """Every prompt fits the model (its kinds of media, their layout, its length), checked before any answer is
    written, one document's media at a time; objects: every target's objects fit its image
    (`user_locations.check_objects`)."""
    for q in questions:
        doc = with_media(q.prompt, source)
        try:
            collator.encode(doc, prompt_only=not pairs)
        except ValueError as e:
            raise DocumentError(f"{source}, line {doc.line}: {e}") from e
        if objects:
            check_objects(doc, source)


def predict(model: nn.Module, collator, tokenizer: Tokenizer, questions: list[Item], source: str | Path,
            batch_size: int, max_new_tokens: int, sampling: dict, blanked: bool = False, bar=None) -> list[str]:
    """The model's answer to each question; blanked: with blank media."""
    out = []
    for i in range(0, len(questions), batch_size):
        chunk = [with_media(q.prompt, source) for q in questions[i:i + batch_size]]
        out += answer(model, collator, tokenizer, [blank(d) for d in chunk] if blanked else chunk, max_new_tokens,
                      sampling)
        if bar is not None:
            bar.update(len(chunk))
    return out


@torch.no_grad()
def similarities(model: nn.Module, collator, docs: list[Document], texts: list[str] | tuple[str, ...],
                 batch_size: int, source: str | Path = "", blanked: bool = False) -> torch.Tensor:
    """(N_img, N_txt) similarity of each document's image (blank if blanked) to each text; media not yet loaded
    are read from `source`'s folder a batch at a time."""
    device = next(model.parameters()).device
    tokens = {k: v.to(device) for k, v in collator.texts([collator.format.text(t) for t in texts]).items()}
    text_embeds = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    rows = []
    for i in range(0, len(docs), batch_size):
        chunk = [with_media(d, source) for d in docs[i:i + batch_size]]
        pixels = torch.cat([collator.encode(blank(d) if blanked else d).media["pixel_values"] for d in chunk])
        pixels = pixels.to(device)
        rows.append(model.logits(model.encode_image(pixels), text_embeds).T.cpu())  # logits are (N_txt, N_img)
    return torch.cat(rows)


def recall(sim: torch.Tensor, texts: list[str], questions: list[Item]) -> dict[str, float]:
    """Image -> text and text -> image recall@k of the (N_img, N_txt) similarities: an image is found when one
    of its references is among the k texts nearest it, a text when one of the k images nearest it has it as
    a reference."""
    right = torch.tensor([[t in q.references for t in texts] for q in questions])  # (N_img, N_txt)
    out = {}
    for direction, s, r in (("image_to_text", sim, right), ("text_to_image", sim.T, right.T)):
        order = s.argsort(dim=1, descending=True)
        hits = r.gather(1, order)  # (rows, candidates) in rank order
        for k in RECALL_AT:
            out[f"{direction}_R@{k}"] = hits[:, :k].any(1).float().mean().item()
    return out


def majority(train: list[Item], questions: list[Item]) -> list[str]:
    """The most frequent training answer to each question's text, else to its task, else to any question."""
    by_text, by_task, overall = {}, {}, Counter()
    for q in train:
        by_text.setdefault(q.question, Counter())[q.answer] += 1
        by_task.setdefault(q.task, Counter())[q.answer] += 1
        overall[q.answer] += 1
    top = lambda c: c.most_common(1)[0][0]  # noqa: E731
    return [top(by_text.get(q.question) or by_task.get(q.task) or overall) for q in questions]


def groups(questions: list[Item]) -> dict[str, list[int]]:
    """Question indices of the whole file ("all") and, when documents carry one, of each task."""
    out = {"all": list(range(len(questions)))}
    if any(q.task is not None for q in questions):
        for i, q in enumerate(questions):
            out.setdefault(q.task if q.task is not None else "(no task)", []).append(i)
    return out


def scored(metric: str, questions: list[Item], predictions: dict[str, list[str] | None]) -> tuple[list, list[float]]:
    """Rows (task, n, then each named prediction list's figure: None where the list is None) and the model's
    per-question scores (the first list's)."""
    score: Callable = METRICS[metric].score
    refs = [q.references for q in questions]
    rows = []
    for task, idx in groups(questions).items():
        figures = {name: None if p is None else score([p[i] for i in idx], [refs[i] for i in idx])[0]
                   for name, p in predictions.items()}
        rows.append({"task": task, "n": len(idx), **figures})
    return rows, score(next(iter(predictions.values())), refs)[1]


SLACK = 4  # tokens an answer may run past the longest reference before it is cut


@torch.no_grad()
def evaluate_file(model: nn.Module, tokenizer: Tokenizer, docs: list[Document], data: str | Path, metric: str,
                  batch_size: int, max_new_tokens: int | None = None, sampling: dict | None = None,
                  train_docs: list[Document] | None = None, progress: Callable | None = None
                  ) -> tuple[list[dict], list[dict]]:
    """(one record per question: id, task, prompt, prediction, references, score; one row of figures per group)
    of the model on `docs`, read from `data` (`read_documents`); train_docs: the run's training documents, for
    the majority baseline. progress: called with (answers to write, what), returns a `Progress`."""
    pairs = spec_of(model).pairs
    questions = items(docs, data, pairs)
    objects = metric == "boxes"
    if objects:
        check_targets(questions, data)
    if metric == "vqa" and (alone := next((q for q in questions if len(q.references) < 2), None)):
        raise DocumentError(f"{data}, {alone.id}: --metric vqa scores an answer by the other annotators who gave it "
                            "(VQAv2 has 10 per question), so a question with one reference scores 0 whatever the "
                            "answer; give each target its \"references\", or use --metric exact")
    train = items(train_docs, "the run's training file", pairs, required=False) if train_docs else None
    collator = make_collator(model.config, tokenizer)
    check(collator, questions, data, pairs, objects)
    if pairs:
        return retrieval(model, collator, questions, data, batch_size, train, progress)
    longest = (answer_tokens(tokenizer, questions) if objects else
               max(len(tokenizer.encode(r)) for q in questions for r in q.references))
    media = any(s.kind != "text" for q in questions for s in q.prompt.segments)
    bar = progress(len(questions) * (1 + media), "answers") if progress is not None else None
    run = lambda blanked: predict(model, collator, tokenizer, questions, data, batch_size,  # noqa: E731
                                  max_new_tokens or longest + SLACK, sampling or {}, blanked, bar)
    # the training file's media are read before any answer is written: a moved image fails here, not after them
    common = majority_box(train, "the run's training file") if objects and train else None
    predictions = run(False)
    blanked = run(True) if media else None
    if objects:
        extras, rows = score_objects(questions, data, mask_vae_of(model), predictions, blanked, common,
                                     groups(questions))
        return [{**record(q, p, e["score"]), **e} for q, p, e in zip(questions, predictions, extras)], rows
    rows, per = scored(metric, questions, {"score": predictions, "blanked": blanked,
                                           "majority": majority(train, questions) if train else None})
    return [record(q, p, s) for q, p, s in zip(questions, predictions, per)], rows


def retrieval(model: nn.Module, collator, questions: list[Item], source: str | Path, batch_size: int,
              train: list[Item] | None, progress: Callable | None) -> tuple[list[dict], list[dict]]:
    """evaluate_file for a dual encoder: per group, its images against its captions, and the same blanked;
    a record's prediction is the caption nearest its image among all of the file's."""
    named = groups(questions)
    bar = progress(2 * sum(map(len, named.values())), "images") if progress is not None else None
    rows, records = [], []
    common = majority(train, questions) if train else None
    for task, idx in named.items():
        group = [questions[i] for i in idx]
        texts = sorted({r for q in group for r in q.references})
        docs = [q.prompt for q in group]
        sim = similarities(model, collator, docs, texts, batch_size, source)
        figures = recall(sim, texts, group)
        blanked = recall(similarities(model, collator, docs, texts, batch_size, source, blanked=True), texts, group)
        if bar is not None:
            bar.update(2 * len(group))
        guess = [common[i] in questions[i].references for i in idx] if common else None
        rows.append({"task": task, "n": len(group), "score": figures["image_to_text_R@1"],
                     "blanked": blanked["image_to_text_R@1"], "majority": sum(guess) / len(guess) if guess else None,
                     **figures})
        if task == "all":
            best = [texts[j] for j in sim.argmax(1).tolist()]
            records = [record(q, b, float(b in q.references)) for q, b in zip(group, best)]
    return records, rows


def record(question: Item, prediction: str, score: float) -> dict:
    return {"id": question.id, **({"task": question.task} if question.task is not None else {}),
            "prompt": question.text, "prediction": prediction, "references": question.references, "score": score}
