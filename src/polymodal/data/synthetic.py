"""The built-in world: a small, seeded multimodal data set that needs no download.

Images of coloured shapes on a dark background (caption, colour, shape, count, position, and a
comparison asked directly or with a short chain of thought: "are there more red than blue shapes?"), short
videos of a moving shape (direction), clips of sine beeps (count, rising or falling pitch),
text→image pairs ("draw a red circle in the top left") and an answer in two modalities: say what
the image shows, then draw it (its canonical picture, `World.draw`). Answers come from small fixed sets, so
chance is known and a tiny model has to look and listen to beat it. Every example is a pure
function of (seed, split, task, index); "train" and "eval" draw from independent random streams.

The eval split is held out compositionally, so that it can only be answered by generalising
(tests/data/test_held_out.py checks that no eval document or media file occurs in training):
- every shape of an eval image stands in the one cell its object never occupies in training
  (`HELD_OUT_CELL`); training also never shows an object in its held-out size (`HELD_OUT_SIZE`)
  nor a colour on its held-out background tint (`HELD_OUT_BACKGROUND`), which eval images may;
- text→image prompts of eval name those held-out (object, cell) pairs, so no eval prompt nor
  target is ever drawn in training;
- say_and_draw reads the held-out images above; its drawn answer is one of the 12 canonical
  pictures (a closed set of answers, like the words "red circle"), which training draws too;
- detect and segment ask for the box (and mask) of 1-3 objects of such a scene, each in its held-out cell in eval;
  the boxes and masks are the rendered shapes' own pixels (each shape drawn alone by the call that drew it);
- eval videos move an object in the direction it never moves in training, by a distance
  (speed) training never uses; eval beeps and sweeps have pitches and durations from bands
  that training never plays.
Half of training's colour-free questions (the shape of one shape, the position of the asked shape among
others, the direction a shape moves) show grey shapes: a grey shape is none of the 12 objects, so it may stand
in any cell and move any way, and an answer cannot lean on what training never shows an object do (a model
that learns that prior answers held-out questions wrong; README, "the main job").

    world = World(seed=0)
    ex = world.sample("colour", 7)              # Example(document, answer="red", choices, task)
    for ex in world.examples("eval", n=1000):   # a shuffled mix of all tasks
        ...
"""

from __future__ import annotations

import itertools
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from polymodal.errors import InputError
from polymodal.data.documents import Audio, Document, Segment, boxes_segment, write_jsonl

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 70, 235), "yellow": (225, 215, 30)}
SHAPES = ("circle", "square", "triangle")
OBJECTS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # "red circle", ...
CELLS = ("top left", "top right", "bottom left", "bottom right")  # row-major 2x2 grid
SIZES = ("small", "large")
TINTS = ("red", "green", "blue")  # the brightest channel of a dark background
DIRECTIONS = ("left", "right", "up", "down")
NUMBERS = ("one", "two", "three")
COUNTS = ("none", *NUMBERS)  # a colour's count in a comparison's chain of thought
PITCHES = ("rising", "falling")
SPLITS = ("train", "eval")

COT_SUFFIX = " count first"  # asks for the chain of thought: "two and one, so yes"
PROMPTS = {
    "caption": "caption",
    "colour": "what colour is the shape?",
    "shape": "what shape is it?",
    "count": "how many shapes?",
    "position": "where is the {}?",
    "video_direction": "which way does it move?",
    "audio_count": "how many beeps?",
    "audio_pitch": "does the pitch rise or fall?",
    "text_to_image": "draw a {} in the {}",
    "say_and_draw": "say what it is, then draw it",
    "compare": "are there more {} than {} shapes?",
    "compare_cot": "are there more {} than {} shapes?" + COT_SUFFIX,
}
# Tasks answered with places, as PaliGemma answers them: the box (detect) or the box and the mask (segment) of each
# object the prompt names, in its order ("detect red circle ; blue square"). Their answers are no closed set: they
# are scored by box IoU and mask IoU (evaluate/locations.py), and a mix of tasks (`World.examples`) draws them only
# when named.
LOCATION_PROMPTS = {"detect": "detect {}", "segment": "segment {}"}
LOCATION_TASKS = tuple(LOCATION_PROMPTS)
MIXED_TASKS = tuple(PROMPTS)  # what a mix of tasks draws from by default
TASKS = (*PROMPTS, *LOCATION_TASKS)
CHOICES = {
    "caption": tuple(f"a {o}" for o in OBJECTS),
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": NUMBERS,
    "position": CELLS,
    "video_direction": DIRECTIONS,
    "audio_count": NUMBERS,
    "audio_pitch": PITCHES,
    # the answer names what the image must show; describe() checks a generated one
    "text_to_image": tuple(f"a {o} in the {c}" for o in OBJECTS for c in CELLS),
    # said, then drawn as World.draw pictures it; recognise() checks the drawing
    "say_and_draw": tuple(f"a {o}" for o in OBJECTS),
    "compare": ("yes", "no"),
    # the two colours' counts, then the answer they give; at most 4 shapes, 3 of a colour, never a tie
    "compare_cot": tuple(f"{COUNTS[a]} and {COUNTS[b]}, so {'yes' if a > b else 'no'}"
                         for a in range(4) for b in range(4) if a != b and a + b <= 4),
    # the labels a location answer names beside its boxes
    "detect": OBJECTS,
    "segment": OBJECTS,
}
DRAWN = ("text_to_image", "say_and_draw")  # tasks whose answer is (or ends with) an image
COT_TASKS = {"compare_cot": "compare"}  # a task asked with a chain of thought -> the same question asked directly

# The compositional split: what each object (index colour * 3 + shape) never shows in training.
# Every cell, size and tint still appears in training with other objects and colours.
HELD_OUT_CELL = {o: CELLS[(i // 3 + i % 3) % 4] for i, o in enumerate(OBJECTS)}
HELD_OUT_SIZE = {o: SIZES[(i % 3 + i // 6) % 2] for i, o in enumerate(OBJECTS)}
HELD_OUT_BACKGROUND = {c: TINTS[i % 3] for i, c in enumerate(COLOURS)}
HELD_OUT_DIRECTION = {o: DIRECTIONS[(i // 3 + i % 3) % 4] for i, o in enumerate(OBJECTS)}
# (low, high) bands that only eval draws from, as fractions of the full ranges below
HELD_OUT_BAND = (0.4, 0.6)

# the mixing stream's id, apart from every task's own (tasks added later skip it, so mixes stay the same)
_MIX_STREAM = 9
_MAX_BACKGROUND = 40  # per channel: backgrounds are dark, every shape colour has a channel >= 180
_COLOUR_JITTER = 20
GREYS = (150, 256)  # the brightness of a grey shape: [150, 256) in every channel, none of the COLOURS
GREY_SHARE = 0.5  # of training's shape and video questions asked about a grey shape, of position questions with
                  # grey others
_FOREGROUND = 128  # max channel at or above this is shape, below is background
_GREY_SPREAD = 60  # a mean shape pixel whose channels lie closer than this is grey (palette entries span >= 190)


@dataclass
class Example:
    document: Document
    answer: str
    choices: tuple[str, ...]
    task: str


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def _draw(size: int, background: tuple[int, ...] | int, shapes: Iterable[tuple[str, tuple[int, ...] | int, int, int, int]],
          mode: str = "RGB") -> Image.Image:
    """shapes: (shape, fill, x, y, side), the shape filling the side x side box at (x, y)."""
    im = Image.new(mode, (size, size), background)
    draw = ImageDraw.Draw(im)
    for shape, rgb, x, y, s in shapes:
        box = (x, y, x + s - 1, y + s - 1)
        if shape == "circle":
            draw.ellipse(box, fill=rgb)
        elif shape == "square":
            draw.rectangle(box, fill=rgb)
        else:
            draw.polygon([(x, y + s - 1), (x + s - 1, y + s - 1), (x + (s - 1) / 2, y)], fill=rgb)
    return im


def _tone(n: int, sample_rate: int, f0: float, f1: float, amplitude: float) -> np.ndarray:
    """A linear sweep from f0 to f1 Hz over n samples, with 5 ms fades so it does not click."""
    t = np.arange(n) / sample_rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * n / sample_rate))
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.005 * sample_rate))
    return amplitude * fade * np.sin(phase)


@dataclass(frozen=True)
class World:
    seed: int = 0
    image_size: int = 32
    video_frames: int = 4
    sample_rate: int = 16_000
    audio_seconds: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.image_size < 16:
            raise InputError(f"image_size must be >= 16 so shapes stay recognisable, got {self.image_size}")
        if self.video_frames < 2:
            raise InputError(f"video_frames must be >= 2 to show movement, got {self.video_frames}")
        if self.sample_rate < 4000:
            raise InputError(f"sample_rate must be >= 4000 Hz (tones reach 1.3 kHz), got {self.sample_rate}")
        if self.audio_seconds < 0.5:
            raise InputError(f"audio_seconds must be >= 0.5 to fit three beeps, got {self.audio_seconds}")

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS

    def choices(self, task: str) -> tuple[str, ...]:
        _check_task(task)
        return CHOICES[task]

    def chance(self, task: str) -> float:
        """One over the number of answers (a location answer's chance of naming the right label)."""
        return 1 / len(self.choices(task))

    def texts(self, tasks: Iterable[str] = ()) -> list[str]:
        """Every prompt and answer string the world's mixed tasks use, and those of the location tasks named in
        `tasks` (single-object prompts: the labels), e.g. to train a tokenizer."""
        pairs = list(itertools.permutations(COLOURS, 2))
        fills = {"position": [(o,) for o in OBJECTS], "text_to_image": list(itertools.product(OBJECTS, CELLS)),
                 "compare": pairs, "compare_cot": pairs}
        prompts = [p.format(*f) for task, p in PROMPTS.items() for f in fills.get(task, [()])]
        prompts += [LOCATION_PROMPTS[t].format(o) for t in LOCATION_TASKS if t in tasks for o in OBJECTS]
        return sorted({*prompts, *itertools.chain(*(CHOICES[t] for t in PROMPTS))})

    def sample(self, task: str, index: int, split: str = "train") -> Example:
        _check_task(task)
        if index < 0:
            raise InputError(f"index must be >= 0, got {index}")
        rng = self._rng(split, _task_stream(task), index)
        if task in LOCATION_TASKS:
            image, prompt, objects = self._locations(rng, split, task == "segment")
            segments = [image, Segment("text", prompt), objects]
            answer = objects.text
        elif task == "text_to_image":
            image, obj, cell = self._target(rng, split)
            segments = [Segment("text", PROMPTS[task].format(obj, cell)), Segment("image", media=image, target=True)]
            answer = f"a {obj} in the {cell}"
        elif task == "say_and_draw":
            image, colour, shape = self._single(rng, split)
            answer = f"a {colour} {shape}"
            segments = [image, Segment("text", PROMPTS[task]), Segment("text", answer, target=True),
                        Segment("image", media=self.draw(colour, shape), target=True)]
        else:
            media, prompt, answer = getattr(self, f"_{task}")(rng, split)
            segments = [media, Segment("text", prompt), Segment("text", answer, target=True)]
        return Example(Document(segments, id=f"{split}/{task}/{index}"), answer, CHOICES[task], task)

    def examples(self, split: str = "train", tasks: str | Iterable[str] | None = None,
                 n: int | None = None) -> Iterator[Example]:
        """A shuffled mix of tasks (default: MIXED_TASKS); the k-th example of a task is sample(task, k, split).
        Endless when n is None."""
        tasks = MIXED_TASKS if tasks is None else (tasks,) if isinstance(tasks, str) else tuple(tasks)
        for task in tasks:
            _check_task(task)
        if not tasks:
            raise InputError("tasks must name at least one task")
        rng = self._rng(split, _MIX_STREAM, 0)

        def stream() -> Iterator[Example]:
            seen = dict.fromkeys(tasks, 0)
            for _ in itertools.count() if n is None else range(n):
                task = tasks[rng.integers(len(tasks))]
                yield self.sample(task, seen[task], split)
                seen[task] += 1

        return stream()

    def draw(self, colour: str, shape: str) -> Image.Image:
        """The canonical picture of one shape: pure palette colour, centred, on black."""
        if colour not in COLOURS or shape not in SHAPES:
            raise InputError(f"expected a colour in {tuple(COLOURS)} and a shape in {SHAPES}, "
                             f"got {colour!r} and {shape!r}")
        s = self.image_size // 2
        x = (self.image_size - s) // 2
        return _draw(self.image_size, (0, 0, 0), [(shape, COLOURS[colour], x, x, s)])

    # -- internals ------------------------------------------------------------------------------

    def _rng(self, split: str, stream: int, index: int) -> np.random.Generator:
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        return np.random.default_rng([self.seed, SPLITS.index(split), stream, index])

    def _jitter(self, rng: np.random.Generator, name: str) -> tuple[int, ...]:
        rgb = np.array(COLOURS[name]) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3)
        return tuple(int(c) for c in np.clip(rgb, 0, 255))

    def _background(self, rng: np.random.Generator, tint: str) -> tuple[int, ...]:
        """A dark background whose brightest channel (by at least 5) is the tint's."""
        rgb = rng.integers(0, 21, 3)
        rgb[TINTS.index(tint)] = rng.integers(rgb.max() + 5, _MAX_BACKGROUND + 1)
        return tuple(int(c) for c in rgb)

    def _side(self, rng: np.random.Generator, split: str, obj: str) -> int:
        """A shape's side: training never draws an object in its held-out size, eval draws any size."""
        lo, hi = round(0.3 * self.image_size), self.image_size // 2 - 2
        mid = (lo + hi + 1) // 2  # small: [lo, mid), large: [mid, hi]
        sizes = [s for s in SIZES if split == "eval" or s != HELD_OUT_SIZE[obj]]
        small = sizes[rng.integers(len(sizes))] == "small"
        return int(rng.integers(lo, mid) if small else rng.integers(mid, hi + 1))

    def _place(self, rng: np.random.Generator, split: str, obj: str, cell: str, grey: bool = False) -> tuple:
        """One shape drawn inside its grid cell, 1 px from the cell's edges so shapes never touch; grey: in a
        grey of random brightness instead of the object's colour."""
        half, side = self.image_size // 2, self._side(rng, split, obj)
        i = CELLS.index(cell)
        x = (i % 2) * half + 1 + int(rng.integers(0, half - 1 - side))
        y = (i // 2) * half + 1 + int(rng.integers(0, half - 1 - side))
        colour, shape = obj.split()
        rgb = (int(rng.integers(*GREYS)),) * 3 if grey else self._jitter(rng, colour)
        return shape, rgb, x, y, side

    def _scene(self, rng: np.random.Generator, split: str, n: int, grey: Container[int] = ()
               ) -> tuple[Image.Image, list[tuple[str, str, str]]]:
        """n shapes of distinct objects in distinct grid cells. In eval every object stands in its
        held-out cell; in training never, nor in its held-out size, nor on its colour's held-out tint.
        Returns the image and (colour, shape, cell) per shape. grey: the shapes (by index) drawn grey."""
        image, names, _ = self._scene_shapes(rng, split, n, grey)
        return image, names

    def _scene_shapes(self, rng: np.random.Generator, split: str, n: int, grey: Container[int] = ()
                      ) -> tuple[Image.Image, list[tuple[str, str, str]], list[tuple]]:
        """`_scene`, and each shape as drawn: (shape, rgb, x, y, side)."""
        tint = TINTS[rng.integers(len(TINTS))]
        drawn, names = [], []
        for k, cell in enumerate(CELLS[i] for i in rng.permutation(len(CELLS))[:n]):
            taken = {f"{c} {s}" for c, s, _ in names}
            allowed = [o for o in OBJECTS if o not in taken and (
                HELD_OUT_CELL[o] == cell if split == "eval"
                else HELD_OUT_CELL[o] != cell and HELD_OUT_BACKGROUND[o.split()[0]] != tint)]
            obj = allowed[rng.integers(len(allowed))]
            drawn.append(self._place(rng, split, obj, cell, k in grey))
            names.append((*obj.split(), cell))
        return _draw(self.image_size, self._background(rng, tint), drawn), names, drawn

    def _locations(self, rng: np.random.Generator, split: str, masks: bool) -> tuple[Segment, str, Segment]:
        """1-3 shapes, the first 1..n of them (random objects in random cells) asked for in order; half of
        training's scenes draw the others grey, as position questions do. Each object's mask is its shape drawn
        alone by the same call that drew it into the image (shapes never overlap), its box the mask's extent."""
        n = int(rng.integers(1, 4))
        k = int(rng.integers(1, n + 1))
        grey = rng.random() < GREY_SHARE and split == "train"
        image, names, drawn = self._scene_shapes(rng, split, n, grey=range(k, n) if grey else ())
        labels = [f"{c} {s}" for c, s, _ in names[:k]]
        shapes = [_draw(self.image_size, 0, [(shape, 255, x, y, side)], mode="L")
                  for shape, _, x, y, side in drawn[:k]]
        boxes = [(label, tuple(float(v) for v in mask.getbbox())) for label, mask in zip(labels, shapes)]
        prompt = LOCATION_PROMPTS["segment" if masks else "detect"].format(" ; ".join(labels))
        return Segment("image", media=image), prompt, boxes_segment(boxes, shapes if masks else None)

    def _target(self, rng: np.random.Generator, split: str) -> tuple[Image.Image, str, str]:
        """A text->image target: one object in a named cell; eval asks only for held-out (object, cell) pairs."""
        obj = OBJECTS[rng.integers(len(OBJECTS))]
        if split == "eval":
            cell, tint = HELD_OUT_CELL[obj], TINTS[rng.integers(len(TINTS))]
        else:
            cells = [c for c in CELLS if c != HELD_OUT_CELL[obj]]
            tints = [t for t in TINTS if t != HELD_OUT_BACKGROUND[obj.split()[0]]]
            cell, tint = cells[rng.integers(len(cells))], tints[rng.integers(len(tints))]
        image = _draw(self.image_size, self._background(rng, tint), [self._place(rng, split, obj, cell)])
        return image, obj, cell

    def _single(self, rng: np.random.Generator, split: str, grey: bool = False) -> tuple[Segment, str, str]:
        image, [(colour, shape, _)] = self._scene(rng, split, 1, (0,) if grey else ())
        return Segment("image", media=image), colour, shape

    def _caption(self, rng: np.random.Generator, split: str) -> tuple[Segment, str, str]:
        image, colour, shape = self._single(rng, split)
        return image, PROMPTS["caption"], f"a {colour} {shape}"

    def _colour(self, rng: np.random.Generator, split: str) -> tuple[Segment, str, str]:
        image, colour, _ = self._single(rng, split)
        return image, PROMPTS["colour"], colour

    def _shape(self, rng: np.random.Generator, split: str) -> tuple[Segment, str, str]:
        grey = split == "train" and rng.random() < GREY_SHARE  # eval draws nothing more: its stream is unchanged
        image, _, shape = self._single(rng, split, grey)
        return image, PROMPTS["shape"], shape

    def _count(self, rng: np.random.Generator, split: str) -> tuple[Segment, str, str]:
        n = int(rng.integers(1, 4))
        image, _ = self._scene(rng, split, n)
        return Segment("image", media=image), PROMPTS["count"], NUMBERS[n - 1]

    def _position(self, rng: np.random.Generator, split: str) -> tuple[Segment, str, str]:
        n = int(rng.integers(1, 4))
        if split == "train" and rng.random() < GREY_SHARE:  # the other shapes grey: no object's prior cells to lean on
            asked = int(rng.integers(n))
            image, names = self._scene(rng, split, n, grey=[k for k in range(n) if k != asked])
        else:
            image, names = self._scene(rng, split, n)
            asked = int(rng.integers(len(names)))
        colour, shape, cell = names[asked]
        return Segment("image", media=image), PROMPTS["position"].format(f"{colour} {shape}"), cell

    def _comparison(self, rng: np.random.Generator, split: str) -> tuple[Segment, str, str, int, int]:
        """2-4 shapes of any colours, and two colours whose counts differ, both present where the scene
        allows (else one absent): the image, the question's colours in either order and their counts."""
        while True:
            image, names = self._scene(rng, split, int(rng.integers(2, 5)))
            counts = {c: sum(n[0] == c for n in names) for c in COLOURS}
            pairs = [(a, b) for a, b in itertools.permutations(COLOURS, 2) if counts[a] != counts[b]]
            pairs = [(a, b) for a, b in pairs if counts[a] and counts[b]] or pairs
            if pairs:
                a, b = pairs[rng.integers(len(pairs))]
                return Segment("image", media=image), a, b, counts[a], counts[b]

    def _compare(self, rng: np.random.Generator, split: str) -> tuple[Segment, str, str]:
        image, a, b, na, nb = self._comparison(rng, split)
        return image, PROMPTS["compare"].format(a, b), "yes" if na > nb else "no"

    def _compare_cot(self, rng: np.random.Generator, split: str) -> tuple[Segment, str, str]:
        image, a, b, na, nb = self._comparison(rng, split)
        chain = f"{COUNTS[na]} and {COUNTS[nb]}, so {'yes' if na > nb else 'no'}"
        return image, PROMPTS["compare_cot"].format(a, b), chain

    def _video_direction(self, rng: np.random.Generator, split: str) -> tuple[Segment, str, str]:
        """Eval moves an object in its held-out direction, by a held-out distance (speed); half of training's
        videos move a grey shape, which is no object, in any direction."""
        size, frames = self.image_size, self.video_frames
        grey = split == "train" and rng.random() < GREY_SHARE  # eval draws nothing more: its stream is unchanged
        obj = OBJECTS[rng.integers(len(OBJECTS))]
        colour, shape = obj.split()
        largest = round(0.35 * size)
        side = int(rng.integers(round(0.25 * size), largest + 1))
        background = tuple(int(c) for c in rng.integers(0, _MAX_BACKGROUND + 1, 3))
        rgb = (int(rng.integers(*GREYS)),) * 3 if grey else self._jitter(rng, colour)
        directions = [d for d in DIRECTIONS if grey or (d == HELD_OUT_DIRECTION[obj]) == (split == "eval")]
        direction = directions[rng.integers(len(directions))]
        room = size - side - 2  # how far the shape can travel and stay 1 px inside the frame
        least_room = size - largest - 2  # the same distances (speeds) for every side
        distance = _integer(rng, split, least_room // 2, least_room)
        start = 1 + int(rng.integers(0, room - distance + 1))
        across = 1 + int(rng.integers(0, room + 1))
        a, b = (start + distance, start) if direction in ("left", "up") else (start, start + distance)
        video = []
        for t in range(frames):
            along = round(a + (b - a) * t / (frames - 1))
            x, y = (along, across) if direction in ("left", "right") else (across, along)
            video.append(_draw(size, background, [(shape, rgb, x, y, side)]))
        return Segment("video", media=video), PROMPTS["video_direction"], direction

    def _audio_count(self, rng: np.random.Generator, split: str) -> tuple[Segment, str, str]:
        """Eval beeps have a held-out pitch and held-out lengths."""
        sr, seconds = self.sample_rate, self.audio_seconds
        n = int(rng.integers(1, 4))
        lengths = np.array([_uniform(rng, split, 0.06, 0.15) for _ in range(n)]) * seconds
        gap, edge = 0.08 * seconds, 0.02 * seconds  # silence between beeps and at the ends
        slack = seconds - lengths.sum() - gap * (n - 1) - 2 * edge
        spare = rng.dirichlet(np.ones(n + 1)) * slack  # random extra silence before each beep
        freq, amplitude = _uniform(rng, split, 400, 1000), rng.uniform(0.3, 0.8)
        x = rng.normal(0, 0.005, round(seconds * sr))
        t = edge
        for length, extra in zip(lengths, spare):
            t += extra
            i, m = round(t * sr), round(length * sr)
            x[i:i + m] += _tone(m, sr, freq, freq, amplitude)
            t += length + gap
        audio = Audio(np.clip(x, -1, 1).astype(np.float32), sr)
        return Segment("audio", media=audio), PROMPTS["audio_count"], NUMBERS[n - 1]

    def _audio_pitch(self, rng: np.random.Generator, split: str) -> tuple[Segment, str, str]:
        """Eval sweeps have a held-out lower pitch and a held-out duration."""
        sr, seconds = self.sample_rate, self.audio_seconds
        low = _uniform(rng, split, 300, 600)
        high = low * rng.uniform(1.6, 2.2)
        rising = bool(rng.integers(2))
        length = _uniform(rng, split, 0.4, 0.8) * seconds
        start = rng.uniform(0.05 * seconds, 0.95 * seconds - length)
        x = rng.normal(0, 0.005, round(seconds * sr))
        i, m = round(start * sr), round(length * sr)
        f0, f1 = (low, high) if rising else (high, low)
        x[i:i + m] += _tone(m, sr, f0, f1, rng.uniform(0.3, 0.8))
        audio = Audio(np.clip(x, -1, 1).astype(np.float32), sr)
        return Segment("audio", media=audio), PROMPTS["audio_pitch"], PITCHES[0 if rising else 1]


WORLD = World(seed=0)  # the built-in data set: `polymodal train` learns its training split, `polymodal eval` scores
                      # its held-out split


def _task_stream(task: str) -> int:
    i = TASKS.index(task)
    return i if i < _MIX_STREAM else i + 1


def _uniform(rng: np.random.Generator, split: str, lo: float, hi: float) -> float:
    """Uniform over [lo, hi): eval inside the held-out band of the range, training outside it."""
    a, b = (lo + (hi - lo) * f for f in HELD_OUT_BAND)
    if split == "eval":
        return float(rng.uniform(a, b))
    u = float(rng.uniform(lo, hi - (b - a)))
    return u + (b - a) if u >= a else u


def _integer(rng: np.random.Generator, split: str, lo: int, hi: int) -> int:
    """One of lo..hi: eval one in the held-out band of the range, training one outside it."""
    values = np.arange(lo, hi + 1)
    a, b = (lo + (hi + 1 - lo) * f for f in HELD_OUT_BAND)
    held = (values >= a) & (values < b)
    pool = values[held] if split == "eval" else values[~held]
    return int(pool[rng.integers(len(pool))])


def recognise(image: Image.Image | np.ndarray) -> tuple[str, str] | None:
    """(colour, shape) of a single-shape image by pixel analysis, or None if nothing is drawn:
    colour is the palette entry nearest the mean bright pixel ("grey" when its channels are about equal,
    as training's grey shapes are: no palette entry is), shape comes from how much of its bounding box
    the shape fills (square 1, circle pi/4, triangle 1/2)."""
    px = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    fg = px.max(axis=-1) >= _FOREGROUND
    if not fg.any():
        return None
    mean = px[fg].mean(axis=0)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    colour = ("grey" if mean.max() - mean.min() < _GREY_SPREAD
              else list(COLOURS)[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))])
    ys, xs = np.nonzero(fg)
    fill = fg.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return colour, "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def describe(image: Image.Image | np.ndarray) -> str | None:
    """What a single-shape image shows, as a text->image answer ("a red circle in the top left"):
    recognise() for the object, and the cell holding the centre of its bounding box."""
    px = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    seen = recognise(px)
    if seen is None:
        return None
    ys, xs = np.nonzero(px.max(axis=-1) >= _FOREGROUND)
    h, w = px.shape[:2]
    cell = CELLS[2 * int(ys.min() + ys.max() + 1 > h) + int(xs.min() + xs.max() + 1 > w)]
    return f"a {seen[0]} {seen[1]} in the {cell}"


def final_answer(chain: str) -> str | None:
    """The answer a chain of thought ends with ("two and one, so yes" -> "yes"); None if it ends otherwise."""
    head, so, answer = chain.strip().rpartition(", so ")
    return answer if so and head and answer in ("yes", "no") else None


def asked_directly(example: Example) -> Example:
    """A chain-of-thought example (task in COT_TASKS) asked without the chain: same media, the question
    without its request for a chain, the chain's final answer."""
    direct = COT_TASKS[example.task]
    media, prompt, chain = example.document.segments
    answer = final_answer(chain.text)
    segments = [media, Segment("text", prompt.text.removesuffix(COT_SUFFIX)), Segment("text", answer, target=True)]
    return Example(Document(segments, id=f"{example.document.id}/direct"), answer, CHOICES[direct], direct)


def export_jsonl(world: World, path: str | Path, split: str = "train", n: int = 100,
                 tasks: str | Iterable[str] | None = None) -> list[Example]:
    """Write n examples of the world as a JSONL document file (see documents.py), each with its task, and
    return them."""
    examples = list(world.examples(split, tasks, n))
    write_jsonl([replace(e.document, task=e.task) for e in examples], path)
    return examples
