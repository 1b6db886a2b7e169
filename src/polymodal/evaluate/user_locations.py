"""`polymodal eval RUN --data FILE` on documents whose targets are objects (`{"boxes": [...]}`, masks or not): each
answer read with `parse_locations` (its masks decoded by the model's mask VQ-VAE) and scored as the built-in world's
detection and segmentation are (`locations.py`, big_vision's PaliGemma transfer figures: objects matched by label,
box accuracy at IoU 0.5 and 0.75, mean mask IoU, invalid answers), against the objects and masks of the document,
read by the readers training uses (`data.documents`, `data.masks`).

Decided for a user's file, each checked before any answer is written:
- every target scored holds objects: a text target among them is an error naming its line (text targets go in a
  file of their own, or the whole file is scored as text with `--metric exact`);
- a reference box lies inside its document's one image, as training requires, and a mask has the image's size
  (`with_media`): else an error naming the file, the line and the field.
A model without a mask VQ-VAE has its boxes scored and its masks not (its answers read `boxes_only`), which
`masks_note` says. Beside the model, as for the world: the model with blanked images, and the majority box of the
run's training file (each label's mean box as a share of its image's sides, with its mean mask).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from polymodal.data.documents import Document, Segment, with_media
from polymodal.data.locations import LOC_TOKENS, SEG_TOKENS, SEPARATOR, box_to_bins, has_location_tokens
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.mask_vae import MaskVAE, mask_vae_of
from polymodal.errors import DocumentError, InputError
from polymodal.evaluate.locations import MAJORITY_SCENES, THRESHOLDS, Figures, LocationScore, Majority, \
    location_table, match, read_answer, summary, truth
from polymodal.families import spec_of


def located(docs: Sequence[Document]) -> bool:
    """Does a target of the documents hold objects (so that they are scored as places by default)?"""
    return any(s.target and s.boxes is not None for d in docs for s in d.segments)


def locates(model: nn.Module, tokenizer: Tokenizer) -> bool:
    """Does the model write places as location tokens (its family's format, its tokenizer holding them)?"""
    return spec_of(model).locations and has_location_tokens(tokenizer)


def masks_note(docs: Sequence[Document], model: nn.Module) -> str:
    """Whether masks are scored: "scored", "none given", or "not scored: " and why."""
    if not any(s.masks is not None or s.mask_sources is not None for d in docs for s in d.segments):
        return "none given"
    if mask_vae_of(model) is None:
        return ("not scored: the model holds no mask VQ-VAE to decode its segmentation tokens (a vae-oid.npz beside "
                "its weights is joined when loaded); boxes scored")
    return "scored"


def _place(doc: Document) -> str:
    return doc.origin or f"line {doc.line}"


def check_targets(questions: list, source: str | Path) -> None:
    """Every question's target (the last segment of its prompt) holds objects."""
    for q in questions:
        target = q.prompt.segments[-1]
        if target.boxes is None:
            raise DocumentError(f"{source}, {_place(q.prompt)}, segments[{len(q.prompt.segments) - 1}]: expected a "
                                f"target of objects ({{\"boxes\": [...]}}) as --metric boxes scores, got the text "
                                f"{target.text!r:.60}: give text targets a file of their own, or score the file's "
                                "text with --metric exact")


def check_objects(doc: Document, source: str | Path) -> None:
    """A question's document, media loaded: its target's boxes lie inside its one image."""
    j = len(doc.segments) - 1
    where = f"{source}, {_place(doc)}, segments[{j}].boxes"
    if len(doc.images) != 1:
        raise DocumentError(f"{where}: expected one image whose pixels the boxes are in, got {len(doc.images)} images")
    width, height = doc.images[0].size
    for k, (_, box) in enumerate(doc.segments[j].boxes):
        try:
            box_to_bins(box, (height, width))
        except InputError as e:
            raise DocumentError(f"{where}[{k}].box: {e}") from e


def answer_tokens(tokenizer: Tokenizer, questions: list) -> int:
    """Tokens of the longest target as the answer writes it: per object four location tokens, sixteen segmentation
    tokens (counted on boxes without masks too: an answer may segment what it was asked to detect, and cut short it
    would not parse) and its label; ` ; ` between objects."""
    def length(target: Segment) -> int:
        text = SEPARATOR.join(f"{''.join(LOC_TOKENS[:4])}{''.join(SEG_TOKENS[:16])} {label}"
                              for label, _ in target.boxes)
        return len(tokenizer.encode(text, split_special_tokens=True))
    return max(length(q.prompt.segments[-1]) for q in questions)


def majority(train: list, source: str, n: int = MAJORITY_SCENES) -> Majority | None:
    """The majority box (`locations.Majority`) of the first n training questions whose targets hold objects (None:
    none does)."""
    scenes = []
    for q in train:
        if len(scenes) == n:
            break
        if q.prompt.segments[-1].boxes is not None:
            doc = with_media(q.prompt, source)
            width, height = doc.images[0].size
            scenes.append(((height, width), truth(doc.segments[-1], (height, width))))
    return Majority(scenes) if scenes else None


def _objects(objects) -> list[dict]:
    return [{"label": o.label, "box": list(o.box)} for o in objects]


def score_objects(questions: list, source: str | Path, vae: MaskVAE | None, predictions: list[str],
                  blanked: list[str] | None, common: Majority | None, groups: dict[str, list[int]]
                  ) -> tuple[list[dict], list[dict]]:
    """(per question: its reference objects, the answer's objects, each reference's box and mask IoU, whether the
    answer is invalid, and its score, the share of its objects found at IoU >= 0.5; per group: a row of figures, the
    model's, the blanked images' and the majority box's). vae: the model's mask VQ-VAE (None: masks not scored)."""
    extras, model, baseline, guesses = [], [], [], []
    for i, (q, text) in enumerate(zip(questions, predictions)):
        doc = with_media(q.prompt, source)  # one document's media at a time
        width, height = doc.images[0].size
        want = truth(doc.segments[-1], (height, width))
        if vae is None:
            want = [dataclasses.replace(o, mask=None) for o in want]
        answer = read_answer(text, (height, width), vae, boxes_only=vae is None)
        model.append(match(answer, want))
        if blanked is not None:
            baseline.append(match(read_answer(blanked[i], (height, width), vae, boxes_only=vae is None), want))
        if common is not None:
            guesses.append(match(common.answer([o.label for o in want], (height, width)), want))
        m = model[-1]
        extras.append({"references": _objects(want), "objects": _objects(answer.objects), "box_iou": list(m.box_iou),
                       "mask_iou": None if m.mask_iou is None else list(m.mask_iou), "invalid": m.invalid,
                       "score": sum(b >= THRESHOLDS[0] for b in m.box_iou) / len(m.box_iou)})
    rows = []
    for task, idx in groups.items():
        figures = {name: dataclasses.asdict(summary([matches[i] for i in idx])) if matches else None
                   for name, matches in (("model", model), ("blanked", baseline), ("majority", guesses))}
        rows.append({"task": task, "n": len(idx), "score": figures["model"]["box_accuracy"][0], **figures})
    return extras, rows


def table(rows: list[dict]) -> str:
    """The rows of `score_objects` as the world's location table."""
    figures = lambda r, name: None if r[name] is None else Figures(**r[name])  # noqa: E731
    return location_table([LocationScore(r["task"], r["n"], figures(r, "model"), figures(r, "majority"),
                                         figures(r, "blanked")) for r in rows])
