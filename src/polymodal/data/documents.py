"""Interleaved multimodal documents stored as JSON Lines.

One document per line:

    {"id": "optional", "task": "optional", "segments": [
        {"image": "images/0001.png"},
        {"text": "what colour is the shape?"},
        {"text": "red", "target": true, "references": ["red", "crimson"]}]}

A segment has exactly one kind key: `text` (a string), `image` (a path), `audio` (a path to a
wav file of PCM or float samples, any channel count and rate: resampled to the audio
encoder's rate when encoded) or `video` (a non-empty list of frame image paths). Paths are relative to
the JSONL file's directory. By default a path may point anywhere the reading process may read (an
absolute path, `..`): a JSONL file is trusted like a script. `strict_paths=True` (`polymodal train
--strict-paths`; `polymodal serve` reads so always) refuses any media path that resolves outside the
JSONL's folder: absolute paths, `..` and symlinks leading out. Images are checked for size from their
headers before they are decoded (at most `MAX_IMAGE_PIXELS`); `with_media` loads one document's media
when it is read with load_media=False, so a large data set never has to fit in memory. `target` may mark text segments, and image segments a model should
learn to draw: if any segment of a document is a target, loss goes only on targets; if none is,
all text is (plain interleaved pretraining). Two optional fields serve evaluation (`polymodal eval --data`):
`task` names the document's task (figures are given per task), and `references` on a target text segment
lists the answers its prediction is scored against (VQAv2's ten human answers, COCO's five captions; without
it the segment's own text is the one reference; training learns the segment's text either way).
A detection target is a segment of objects in the pixels of the document's one image,
`{"boxes": [{"label": "red circle", "box": [x1, y1, x2, y2]}], "target": true}`: PaliGemma writes them as its
`<locNNNN>` tokens (`data/locations.py`), any other family as the text `red circle [x1, y1, x2, y2]` (` ; `
between objects). A segmentation target gives every object a `"mask"` too (`Segment.masks`: mode L, 255 inside,
the image's size; PaliGemma's format writes each as 16 segmentation tokens), in any of the forms of
`data/masks.py`: a mask image file's path (nonzero inside; relative like other media), COCO polygons
`[[x0, y0, x1, y1, ...], ...]` or COCO RLE `{"size": [h, w], "counts": [...] or "compressed string"}`. Masks are
drawn when the media are loaded (a mask the image's size, with a pixel inside); `write_jsonl` writes them as
mode-L PNG files (255 inside) beside the images. Every problem in a file raises `DocumentError` naming the file,
the 1-based line, the segment and the field, with what was expected and what was given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import tempfile
import wave
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from polymodal.data import media
from polymodal.data.masks import MaskSource, mask_image, polygons_source, rle_source
from polymodal.errors import DocumentError, InputError, PathKindError, check_text

KINDS = ("text", "image", "audio", "video")
MAX_IMAGE_PIXELS = 8192 * 8192  # larger images are refused from their header, before decoding (~200 MB as RGB)
TARGET_KINDS = ("text", "image")  # an image target is one the model learns to draw


@dataclass(eq=False)
class Audio:
    waveform: np.ndarray  # (N,) float32 in [-1, 1], mono
    sample_rate: int

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Audio):
            return NotImplemented
        return self.sample_rate == other.sample_rate and np.array_equal(self.waveform, other.waveform)


Media = Image.Image | Audio | list[Image.Image]


@dataclass
class Segment:
    kind: str
    text: str | None = None
    media: Media | None = None
    target: bool = False
    references: list[str] | None = None  # the answers a target text is scored against (default: its text)
    # where the media came from; the only media reference when read with load_media=False
    path: str | list[str] | None = field(default=None, compare=False)
    boxes: list[tuple[str, tuple[float, float, float, float]]] | None = None  # (label, (x1, y1, x2, y2) pixels)
    masks: list[Image.Image] | None = None  # per box, the object's pixels (mode L, 255 inside) in the image's size
    # where the masks come from (data/masks.py); the only mask reference when read with load_media=False
    mask_sources: list[MaskSource] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"segment kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "text") != isinstance(self.text, str):
            raise InputError(f"{self.kind!r} segment: {'needs' if self.kind == 'text' else 'takes no'} text, "
                             f"got text={self.text!r}")
        if self.kind == "text":
            check_text(self.text)
        if self.target and self.kind not in TARGET_KINDS:
            raise InputError(f"only {' and '.join(TARGET_KINDS)} segments can be targets, got a target {self.kind} segment")
        if self.boxes is not None and self.kind != "text":
            raise InputError(f"only text segments hold boxes, got boxes on a {self.kind} segment")
        if self.masks is not None and (self.boxes is None or len(self.masks) != len(self.boxes)
                                       or any(not isinstance(m, Image.Image) or m.mode != "L" for m in self.masks)):
            raise InputError(f"masks must be one mode-L image per box, got {len(self.masks)} for "
                             f"{len(self.boxes or [])} box(es)")
        if self.references is not None and not (self.target and self.kind == "text"):
            raise InputError(f"only target text segments have references, got references on a {self.kind} segment "
                             f"{'marked' if self.target else 'not marked'} as a target")


@dataclass
class Document:
    segments: list[Segment]
    id: str | None = None
    task: str | None = None  # what the document asks (figures per task in `polymodal eval --data`)
    line: int | None = field(default=None, compare=False)  # 1-based line of the JSONL file it was read from
    origin: str | None = field(default=None, compare=False)  # where else it was read from: "record 3", "row 3", ...

    def of_kind(self, kind: str) -> list[Any]:
        return [s.text if kind == "text" else s.media for s in self.segments if s.kind == kind]

    @property
    def texts(self) -> list[str]:
        return self.of_kind("text")

    @property
    def images(self) -> list[Image.Image]:
        return self.of_kind("image")

    @property
    def audios(self) -> list[Audio]:
        return self.of_kind("audio")

    @property
    def videos(self) -> list[list[Image.Image]]:
        return self.of_kind("video")

    @property
    def target_mask(self) -> list[bool]:
        """Per segment: does the loss go on it."""
        marked = any(s.target for s in self.segments)
        return [s.target or (s.kind == "text" and not marked) for s in self.segments]


# ---------------------------------------------------------------------------------------------
# wav

def read_wav(f: str | Path | BinaryIO) -> Audio:
    """A wav file of PCM or float samples (any common bit depth and channel count, `media.read_wav`) as mono
    float32 at its own sample rate; ValueError saying what the file holds when it cannot be read."""
    waveform, rate = media.read_wav(f)
    return Audio(waveform, rate)


def wav_bytes(audio: Audio) -> bytes:
    x = np.asarray(audio.waveform, dtype=np.float32)
    if x.ndim != 1:
        raise InputError(f"expected a mono waveform of shape (N,), got shape {x.shape}")
    pcm = np.round(np.clip(x, -1.0, 1.0) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(audio.sample_rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# reading

class _Invalid(Exception):
    def __init__(self, where: str, msg: str):
        super().__init__(where, msg)
        self.where, self.msg = where, msg


def iter_jsonl(path: str | Path, load_media: bool = True, strict_paths: bool = False) -> Iterator[Document]:
    """Documents of a JSONL file, one at a time. With load_media=False media files are neither
    opened nor checked and each media segment holds only its resolved `path` (`with_media` loads them).
    strict_paths: refuse media paths that resolve outside the file's folder."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                doc = _parse_line(raw, path.parent, load_media, strict_paths)
            except _Invalid as e:
                raise DocumentError(f"{path}, line {lineno}, {e.where}: {e.msg}") from e.__cause__
            if doc is not None:
                doc.line = lineno
                yield doc


def read_jsonl(path: str | Path, load_media: bool = True, strict_paths: bool = False) -> list[Document]:
    return list(iter_jsonl(path, load_media, strict_paths))


def with_media(doc: Document, source: str | Path) -> Document:
    """The document with the media of its segments loaded from their paths (read with load_media=False), and
    its objects' masks drawn; DocumentError naming `source`, the line and the segment (or the object's mask) if a
    file is missing or unreadable or a mask does not fit the image."""
    if all((s.media is not None or s.path is None) and (s.masks is not None or s.mask_sources is None)
           for s in doc.segments):
        return doc
    segments = []
    try:
        for i, s in enumerate(doc.segments):
            where = f"segments[{i}].{s.kind}"
            if s.media is None and s.path is not None:
                media = ([_load(p, "image", f"{where}[{j}]") for j, p in enumerate(s.path)] if s.kind == "video"
                         else _load(s.path, s.kind, where))
                s = dataclasses.replace(s, media=media)
            segments.append(s)
        return _with_masks(dataclasses.replace(doc, segments=segments))
    except _Invalid as e:
        raise DocumentError(f"{source}, {doc.origin or f'line {doc.line}'}, {e.where}: {e.msg}") from e.__cause__


def _with_masks(doc: Document) -> Document:
    """The document with its objects' masks drawn from their sources at the size of its one image."""
    pending = [i for i, s in enumerate(doc.segments) if s.mask_sources is not None and s.masks is None]
    if not pending:
        return doc
    if len(doc.images) != 1:
        raise _Invalid(f"segments[{pending[0]}].boxes", f"expected one image whose pixels the masks cover, got "
                                                        f"{len(doc.images)} images")
    width, height = doc.images[0].size
    segments = list(doc.segments)
    for i in pending:
        masks = []
        for j, source in enumerate(segments[i].mask_sources):
            try:
                masks.append(mask_image(source.pixels(width, height)))
            except InputError as e:
                raise _Invalid(f"segments[{i}].boxes[{j}].mask", str(e)) from e
        segments[i] = dataclasses.replace(segments[i], masks=masks)
    return dataclasses.replace(doc, segments=segments)


def _type(x: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(x), "a number")


def _parse_line(raw: bytes, root: Path, load_media: bool, strict_paths: bool) -> Document | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Invalid("document", f"expected UTF-8 text, got undecodable bytes ({e.reason})") from e
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Invalid("document", f"expected one JSON object, got malformed JSON "
                                   f"({e.msg} at character {e.pos + 1})") from e
    if not isinstance(obj, dict):
        raise _Invalid("document", f"expected a JSON object, got {_type(obj)}")
    if unknown := sorted(set(obj) - {"id", "task", "segments"}):
        where = unknown[0] if unknown[0].isprintable() else repr(unknown[0])  # the message stays one line
        raise _Invalid(where, f"expected only the fields 'id', 'task' and 'segments', "
                                   f"got unknown field {unknown[0]!r}")
    for name in ("id", "task"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise _Invalid(name, f"expected a string, got {_type(obj[name])}")
    if "segments" not in obj:
        raise _Invalid("segments", "expected a list of segments, got no 'segments' field")
    segments = obj["segments"]
    if not isinstance(segments, list) or not segments:
        given = "an empty list" if segments == [] else _type(segments)
        raise _Invalid("segments", f"expected a non-empty list of segments, got {given}")
    doc = Document([_parse_segment(s, f"segments[{i}]", root, load_media, strict_paths)
                    for i, s in enumerate(segments)], obj.get("id"), obj.get("task"))
    return _with_masks(doc) if load_media else doc


def _media_path(root: Path, value: str, where: str, strict: bool) -> str:
    if "\x00" in value:  # no file system takes one; os.path would raise a bare ValueError
        raise _Invalid(where, f"expected a file path, got {value!r}, which holds a NUL character")
    path = root / value
    if strict and os.path.commonpath([os.path.realpath(path), os.path.realpath(root)]) != os.path.realpath(root):
        raise _Invalid(where, f"expected a path inside the JSONL's folder {str(root)!r} (strict paths), got {value!r}, "
                              f"which leads to {os.path.realpath(path)!r}")
    return str(path)


def _parse_segment(seg: Any, where: str, root: Path, load_media: bool, strict_paths: bool) -> Segment:
    if not isinstance(seg, dict):
        raise _Invalid(where, f"expected a JSON object, got {_type(seg)}")
    if "boxes" in seg:
        return _boxes_segment(seg, where, root, strict_paths)
    if unknown := sorted(set(seg) - {*KINDS, "target", "references"}):
        raise _Invalid(f"{where}.{unknown[0]}", f"expected one of {', '.join(KINDS)} (and optional target, "
                                               f"references), got unknown key {unknown[0]!r}")
    kinds = [k for k in KINDS if k in seg]
    if len(kinds) != 1:
        given = "none" if not kinds else " and ".join(repr(k) for k in kinds)
        raise _Invalid(f"{where}.{kinds[-1]}" if kinds else where,
                       f"expected exactly one of {', '.join(KINDS)}, got {given}")
    kind, value = kinds[0], seg[kinds[0]]
    target = seg.get("target", False)
    if not isinstance(target, bool):
        raise _Invalid(f"{where}.target", f"expected true or false, got {_type(target)}")
    if target and kind not in TARGET_KINDS:
        raise _Invalid(f"{where}.target",
                       f"expected target only on text or image segments, got it on a segment of kind {kind!r}")
    references = _references(seg, where, kind, target)
    where = f"{where}.{kind}"

    if kind == "text":
        if not isinstance(value, str):
            raise _Invalid(where, f"expected a string, got {_type(value)}")
        try:
            check_text(value, "the text")
        except InputError as e:
            raise _Invalid(where, str(e)) from e
        return Segment("text", text=value, target=target, references=references)
    if kind == "video":
        if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
            given = ("an empty list" if value == [] else _type(value) if not isinstance(value, list)
                     else "a list with a non-string item")
            raise _Invalid(where, f"expected a non-empty list of frame image paths, got {given}")
        paths = [_media_path(root, p, f"{where}[{j}]", strict_paths) for j, p in enumerate(value)]
        frames = [_load(p, "image", f"{where}[{j}]") for j, p in enumerate(paths)] if load_media else None
        return Segment("video", media=frames, path=paths)
    if not isinstance(value, str):
        raise _Invalid(where, f"expected a file path string, got {_type(value)}")
    p = _media_path(root, value, where, strict_paths)
    return Segment(kind, media=_load(p, kind, where) if load_media else None, target=target, path=p)


def _boxes_segment(seg: dict, where: str, root: Path, strict_paths: bool) -> Segment:
    """{"boxes": [{"label": str, "box": [x1, y1, x2, y2], "mask": optional}, ...], "target": true}: objects in the
    image's pixels, every one with a mask or none."""
    if unknown := sorted(set(seg) - {"boxes", "target"}):
        raise _Invalid(f"{where}.{unknown[0]}", f"expected only boxes and target in a boxes segment, got "
                                               f"{unknown[0]!r}")
    if seg.get("target", False) is not True:
        raise _Invalid(f"{where}.target", f"expected true: boxes are an answer to learn, got {seg.get('target')!r}")
    value, where = seg["boxes"], f"{where}.boxes"
    if not isinstance(value, list) or not value:
        given = "an empty list" if value == [] else _type(value)
        raise _Invalid(where, f"expected a non-empty list of objects, got {given}")
    boxes, sources = [], []
    for i, obj in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(obj, dict) or set(obj) - {"mask"} != {"label", "box"}:
            given = _type(obj) if not isinstance(obj, dict) else f"the keys {sorted(obj)}"
            raise _Invalid(at, f"expected an object with the keys 'label' and 'box' (and 'mask'), got {given}")
        if ("mask" in obj) != ("mask" in value[0]):
            raise _Invalid(f"{at}.mask", f"expected a mask on every object of the segment or on none, got one on "
                                         f"object {0 if 'mask' in value[0] else i} and none on object "
                                         f"{i if 'mask' in value[0] else 0}")
        if "mask" in obj:
            sources.append(_mask_source(obj["mask"], f"{at}.mask", root, strict_paths))
        label, box = obj["label"], obj["box"]
        if not isinstance(label, str) or not label.strip() or any(c in label for c in "<>;"):
            raise _Invalid(f"{at}.label", f"expected a non-empty string without '<', '>' or ';', got {label!r}")
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
                or not (0 <= box[0] < box[2] and 0 <= box[1] < box[3])):
            raise _Invalid(f"{at}.box", f"expected [x1, y1, x2, y2] in pixels with 0 <= x1 < x2 and 0 <= y1 < y2, "
                                        f"got {box!r}")
        boxes.append((label.strip(), tuple(float(v) for v in box)))
    return boxes_segment(boxes, mask_sources=sources or None)


def _mask_source(value: Any, where: str, root: Path, strict_paths: bool) -> MaskSource:
    """An object's "mask": a mask image file's path, COCO polygons or COCO RLE (`data/masks.py`)."""
    if isinstance(value, str):
        return MaskSource("file", _media_path(root, value, where, strict_paths))
    try:
        if isinstance(value, list):
            return polygons_source(value)
        if isinstance(value, dict):
            return rle_source(value)
    except InputError as e:
        raise _Invalid(where, str(e)) from e
    raise _Invalid(where, f"expected a mask image path, COCO polygons [[x0, y0, ...], ...] or COCO RLE "
                          f"{{\"size\": [h, w], \"counts\": ...}}, got {_type(value)}")


def boxes_segment(boxes: list[tuple[str, tuple[float, float, float, float]]],
                  masks: list[Image.Image] | None = None, mask_sources: list[MaskSource] | None = None) -> Segment:
    """A target segment of objects, its text `label [x1, y1, x2, y2]` joined by ` ; ` (what families without
    location tokens write)."""
    text = " ; ".join(f"{label} [{', '.join(f'{v:g}' for v in box)}]" for label, box in boxes)
    return Segment("text", text=text, target=True, boxes=boxes, masks=masks, mask_sources=mask_sources)


def _references(seg: dict, where: str, kind: str, target: bool) -> list[str] | None:
    if "references" not in seg:
        return None
    value, where = seg["references"], f"{where}.references"
    if kind != "text" or not target:
        raise _Invalid(where, f"expected references only on a target text segment, got them on a "
                              f"{'target' if target else 'non-target'} {kind} segment")
    if not isinstance(value, list) or not value or not all(isinstance(r, str) for r in value):
        given = ("an empty list" if value == [] else _type(value) if not isinstance(value, list)
                 else "a list with a non-string item")
        raise _Invalid(where, f"expected a non-empty list of answer strings, got {given}")
    return value


def load_media(path: str | Path, kind: str) -> Image.Image | Audio:
    """An image (RGB, `media.to_rgb`) or a wav file (mono, `media.read_wav`); ValueError saying what was expected and what was given."""
    try:
        return _load(str(path), kind, "")
    except _Invalid as e:
        raise InputError(e.msg) from e.__cause__


def _load(path: str, kind: str, where: str) -> Image.Image | Audio:
    if os.path.isdir(path):
        raise _Invalid(where, f"expected an existing {kind} file, got directory {path!r}")
    if not os.path.isfile(path):
        raise _Invalid(where, f"expected an existing {kind} file, got missing file {path!r}")
    return _decode(path, path, kind, where)


def _decode(file: str | BinaryIO, name: str, kind: str, where: str) -> Image.Image | Audio:
    """An image or wav from a path or an open binary file (bytes held by an archive or a table), `name` in errors."""
    try:
        if kind == "audio":
            return read_wav(file)
        return media.open_image(file, MAX_IMAGE_PIXELS)
    except media.TooLarge as e:
        raise _Invalid(where, f"expected an image of at most {MAX_IMAGE_PIXELS:,} pixels, got {name!r} of "
                              f"{e.width}x{e.height}; resize it first") from e
    except (OSError, EOFError, ValueError, Image.DecompressionBombError) as e:
        expected = "a wav file of PCM or float samples" if kind == "audio" else "a readable image file"
        raise _Invalid(where, f"expected {expected}, got {name!r} ({e})") from e


# ---------------------------------------------------------------------------------------------
# writing

@contextlib.contextmanager
def _atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Write to a temp file beside `path`, fsync, then rename over it: readers see the old file
    or the whole new one, never a partial one, and a failed write leaves nothing behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; data files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _png_bytes(image: Image.Image, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    image.convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _objects(segment: Segment, put: Callable[[int, bytes], str]) -> list[dict]:
    """A boxes segment's objects as JSON, each mask written by `put(k, png bytes)` (which gives its path)."""
    masks = segment.masks or [None] * len(segment.boxes)
    return [{"label": label, "box": list(box),
             **({"mask": put(k, _png_bytes(mask_image(np.asarray(m) > 127), "L"))} if m is not None else {})}
            for k, ((label, box), m) in enumerate(zip(segment.boxes, masks))]


def write_jsonl(documents: Iterable[Document], path: str | Path) -> None:
    """Write documents to `path`, media into `<stem>_media/` beside it (images and video
    frames as PNG, objects' masks as mode-L PNG of 255 inside and 0 outside, audio as 16-bit wav), referenced by
    relative paths. Media files go first and
    the JSONL is renamed into place last, so a reader never sees a line whose media is missing."""
    path = Path(path)
    if path.is_dir():
        raise PathKindError(f"expected a .jsonl file to write, got the directory {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    media_dir = path.parent / f"{path.stem}_media"

    def put(name: str, data: bytes) -> str:
        media_dir.mkdir(parents=True, exist_ok=True)
        with _atomic_open(media_dir / name) as f:
            f.write(data)
        return f"{media_dir.name}/{name}"

    with _atomic_open(path) as out:
        for i, doc in enumerate(documents):
            segments = []
            for j, s in enumerate(doc.segments):
                if s.kind != "text" and s.media is None:
                    raise InputError(f"document {i} segment {j}: {s.kind} segment has no media loaded "
                                     "(read it with load_media=True to write it out)")
                if s.masks is None and s.mask_sources is not None:
                    raise InputError(f"document {i} segment {j}: its objects' masks are not loaded (read it with "
                                     "load_media=True to write it out)")
                if s.boxes is not None:
                    seg = {"boxes": _objects(s, lambda k, data: put(f"{i:06d}-{j}-mask{k}.png", data)), "target": True}
                elif s.kind == "text":
                    seg = {"text": s.text, **({"target": True} if s.target else {}),
                           **({"references": s.references} if s.references is not None else {})}
                elif s.kind == "image":
                    seg = {"image": put(f"{i:06d}-{j}.png", _png_bytes(s.media)), **({"target": True} if s.target else {})}
                elif s.kind == "audio":
                    seg = {"audio": put(f"{i:06d}-{j}.wav", wav_bytes(s.media))}
                else:
                    frames = enumerate(s.media)
                    seg = {"video": [put(f"{i:06d}-{j}-{k}.png", _png_bytes(im)) for k, im in frames]}
                segments.append(seg)
            line = {**({"id": doc.id} if doc.id is not None else {}),
                    **({"task": doc.task} if doc.task is not None else {}), "segments": segments}
            out.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
