"""Detection and segmentation on the built-in world's held-out scenes, with the figures big_vision reports for
PaliGemma's transfers (Beyer et al. 2024; `big_vision/evaluators/proj/paligemma/transfers/`): box accuracy at
IoU 0.5 and 0.75, mean mask IoU (segment), and the count of invalid answers. The matching and the figures
(`match`, `summary`, `Majority`) also score a user's documents (`user_locations.py`).

Each object a prompt asks for ("detect red circle ; blue square") is matched to the first object of the answer
with its label not matched before; an object the answer misses scores IoU 0. An answer is invalid when a part of
it is not one well-formed object (`data.locations.parse_locations`: a wrong number of location or segmentation
tokens, an empty box), when it names no object, or when an object of an answer asked for masks has no mask. Masks
are scored where the objects asked for have them. Beside the model, two baselines that do not look: the majority
box (each label's mean box over training scenes as a share of the image's sides, its mask the label's mean training
mask in that box) and the model itself with blanked (black) images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from polymodal.data.documents import Segment
from polymodal.data.locations import LocatedObject, Locations, crop_mask, parse_locations, paste_mask
from polymodal.data.synthetic import OBJECTS, World
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.mask_vae import MaskVAE, mask_vae_of
from polymodal.errors import InputError

THRESHOLDS = (0.5, 0.75)
MAJORITY_SCENES = 1000  # training examples whose boxes and masks the majority baseline averages
MOST_OBJECTS = 3  # a world prompt asks for 1-3 objects
MEAN_MASK_SIZE = 32  # the side the majority baseline averages its mask crops at


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2), x2 and y2 exclusive as in a slice."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two (H, W) bool masks; 0 when both are empty."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


@dataclass(frozen=True)
class Figures:
    objects: int  # objects asked for
    box_accuracy: tuple[float, ...]  # per THRESHOLDS: the share of objects whose matched box has IoU >= it
    mask_iou: float | None  # mean over objects (None: no masks asked for)
    invalid: int  # answers that do not parse as the objects asked for


def is_invalid(answer: Locations, masks: bool) -> bool:
    return bool(answer.malformed) or not answer.objects or (masks and any(o.mask is None for o in answer.objects))


@dataclass(frozen=True)
class Match:
    """One answer against the objects it was asked for."""
    box_iou: tuple[float, ...]  # per object asked for: the IoU of the answer's object matched to it (0: none)
    mask_iou: tuple[float, ...] | None  # the same for masks; None when the objects asked for have none
    invalid: bool


def match(answer: Locations, truth: list[LocatedObject]) -> Match:
    """Each object asked for matched to the first object of the answer with its label not matched before; masks
    are scored when the objects asked for have them (then an answer object without one is invalid)."""
    masks = any(want.mask is not None for want in truth)
    boxes, ious = [], []
    unused = list(answer.objects)
    for want in truth:
        got = next((o for o in unused if o.label == want.label), None)
        if got is not None:
            unused.remove(got)
        boxes.append(box_iou(got.box, want.box) if got is not None else 0.0)
        if masks:
            ious.append(mask_iou(got.mask, want.mask) if got is not None and got.mask is not None else 0.0)
    return Match(tuple(boxes), tuple(ious) if masks else None, is_invalid(answer, masks))


def summary(matches: Sequence[Match]) -> Figures:
    """Box accuracy over every object asked for, mean mask IoU over those with masks, and invalid answers."""
    boxes = [b for m in matches for b in m.box_iou]
    ious = [i for m in matches if m.mask_iou is not None for i in m.mask_iou]
    n = len(boxes)
    return Figures(n, tuple(sum(b >= t for b in boxes) / n for t in THRESHOLDS),
                   sum(ious) / len(ious) if ious else None, sum(m.invalid for m in matches))


def figures(answers: list[Locations], truths: list[list[LocatedObject]]) -> Figures:
    """Box accuracy, mean mask IoU and invalid answers of `answers` against the objects asked for (`truths`)."""
    return summary([match(answer, truth) for answer, truth in zip(answers, truths)])


def truth(segment: Segment, image_size: tuple[int, int]) -> list[LocatedObject]:
    """The objects of a document's target segment, masks as (H, W) bool tensors."""
    masks = segment.masks or [None] * len(segment.boxes)
    return [LocatedObject(label, box, None if m is None else torch.from_numpy(np.asarray(m) > 127))
            for (label, box), m in zip(segment.boxes, masks)]


def read_answer(text: str, image_size: tuple[int, int], vae: MaskVAE | None, boxes_only: bool = False) -> Locations:
    """The answer parsed; one with segmentation tokens the model has no VAE to decode is all malformed (unless
    boxes_only: their masks left out)."""
    try:
        return parse_locations(text, image_size, vae, boxes_only=boxes_only)
    except InputError:
        return Locations([], 1)


def read_answers(texts: list[str], image_size: tuple[int, int], vae: MaskVAE | None) -> list[Locations]:
    return [read_answer(text, image_size, vae) for text in texts]


class Majority:
    """Each label's mean box (a share of its image's sides) over training scenes, and its mean mask crop in that box;
    a label never seen in training gets the mean box of every label."""

    def __init__(self, scenes: Iterable[tuple[tuple[int, int], list[LocatedObject]]]):
        """scenes: each training scene's image (height, width) and objects."""
        boxes: dict[str, list] = {}
        crops: dict[str, list] = {}
        for (h, w), objects in scenes:
            for obj in objects:
                x1, y1, x2, y2 = obj.box
                boxes.setdefault(obj.label, []).append((x1 / w, y1 / h, x2 / w, y2 / h))
                if obj.mask is not None:
                    crops.setdefault(obj.label, []).append(crop_mask(obj.mask, obj.box, MEAN_MASK_SIZE))
        self.every = tuple(np.mean([b for bs in boxes.values() for b in bs], axis=0).tolist())
        self.boxes = {label: tuple(np.mean(bs, axis=0).tolist()) for label, bs in boxes.items()}
        self.crops = {label: torch.stack(cs).mean(0) for label, cs in crops.items()}

    @classmethod
    def of_world(cls, world: World, task: str, n_train: int = MAJORITY_SCENES) -> Majority:
        """The majority of the first n_train training scenes of a world task."""
        size = (world.image_size, world.image_size)
        return cls((size, truth(world.sample(task, i, "train").document.segments[-1], size)) for i in range(n_train))

    def answer(self, labels: list[str], image_size: tuple[int, int]) -> Locations:
        h, w = image_size
        objects = []
        for label in labels:
            x1, y1, x2, y2 = self.boxes.get(label, self.every)
            box = (x1 * w, y1 * h, x2 * w, y2 * h)
            crop = self.crops.get(label)
            mask = paste_mask(crop - 0.5, box, image_size) if crop is not None else None
            objects.append(LocatedObject(label, box, mask))
        return Locations(objects, 0)


@dataclass
class LocationScore:
    task: str
    n: int  # answers (held-out scenes)
    model: Figures
    majority: Figures | None = None
    blanked: Figures | None = None

    @property
    def accuracy(self) -> float:
        """Box accuracy at IoU 0.5: what a training eval tracks."""
        return self.model.box_accuracy[0]


def answer_tokens(tokenizer: Tokenizer, masks: bool) -> int:
    """New tokens that fit the longest world answer: 3 objects of 4 location (+ 16 segmentation) tokens, a label."""
    label = max(len(tokenizer.encode(" " + o)) for o in OBJECTS)
    return MOST_OBJECTS * (4 + 16 * masks + label + len(tokenizer.encode(" ; "))) + 1


def score_locations(replies: Callable[[list, int], list[str]], model: nn.Module, tokenizer: Tokenizer, task: str,
                    examples: list, world: World, blank: Callable | None) -> LocationScore:
    """`replies(docs, max_new_tokens)`: the model's answers to the prompts of docs; `blank(doc)`: the document
    with its images blanked (None: no baselines)."""
    masks = task == "segment"
    size = (world.image_size, world.image_size)
    vae = mask_vae_of(model)
    truths = [truth(e.document.segments[-1], size) for e in examples]
    docs = [e.document for e in examples]
    longest = answer_tokens(tokenizer, masks)
    score = LocationScore(task, len(examples), figures(read_answers(replies(docs, longest), size, vae), truths))
    if blank is not None:
        majority = Majority.of_world(world, task)
        score.majority = figures([majority.answer([o.label for o in t], size) for t in truths], truths)
        blanked = replies([blank(d) for d in docs], longest)
        score.blanked = figures(read_answers(blanked, size, vae), truths)
    return score


def location_table(scores: list[LocationScore]) -> str:
    """Per task: the model's figures, then the majority box's and the blanked images' (box accuracy at each IoU
    threshold, mean mask IoU, invalid answers of n)."""
    head = f"{'task':<8} {'n':>5} {'answers':<9} " + " ".join(f"{'box@' + str(t):>8}" for t in THRESHOLDS) + \
        f" {'mask IoU':>8} {'invalid':>7}"
    rows = [head]
    for s in scores:
        for name, f in (("model", s.model), ("majority", s.majority), ("blanked", s.blanked)):
            if f is None:
                continue
            accuracy = " ".join(f"{a:>8.1%}" for a in f.box_accuracy)
            iou = "-" if f.mask_iou is None else f"{f.mask_iou:.3f}"
            rows.append(f"{s.task:<8} {s.n:>5} {name:<9} {accuracy} {iou:>8} {f.invalid:>7}")
    return "\n".join(rows)
