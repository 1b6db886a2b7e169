"""WebDataset-style tar shards, read lazily: the layout LAION and DataComp image-text sets ship in.

A shard is an uncompressed tar whose members are grouped into samples by key, the name up to the first
dot of its last path part (WebDataset's rule): `000123.jpg` + `000123.txt` is one sample, an image and its
caption (a `.json` member with a `caption` or `text` field stands in for a missing `.txt`). A shard set is
a brace pattern (`train-{000000..000099}.tar`, `{a,b}` lists too), a folder of `.tar` files, or one `.tar`.

Opening a set reads only the tar headers (one seek per member, no contents) into a few numpy arrays,
about 40 bytes a sample: shard, offset and size of the image and of the text. Document i is read when a
batch asks for it, with `os.pread` (no shared file position, so forked data-loader workers and threads
read the same open files safely). A sample is the document [image, caption] with no target: loss on the
caption. Its id is its key.

Because document i is always the same sample, the trainer's data position stays a plain counter: its
per-epoch permutation of positions, cut across processes by rank (positions (m * world + rank) * B + j),
gives each process its own samples and resumes mid-epoch exactly; a `torch.utils.data.DataLoader` over a
`TarShards` (a map-style dataset) splits indices among its workers the same way.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from polymodal.data.documents import Document, DocumentError, Segment, _decode, _Invalid
from polymodal.data.lazy import LazyDocuments
from polymodal.errors import MissingFileError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "ppm", "tif", "tiff")
TEXT_EXTS = ("txt", "json")
KEY = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]*)$")  # key = up to the first dot of the last part
BRACE = re.compile(r"\{([^{}]*)\}")
MAX_OPEN = 64  # shard files held open at once


def expand(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar a-001.tar a-002.tar (zero padding kept); `{x,y}` lists too."""
    m = BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, (head, tail) = m.group(1), (pattern[:m.start()], pattern[m.end():])
    if (r := re.fullmatch(r"(\d+)\.\.(\d+)", body)) is not None:
        lo, hi = r.groups()
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DocumentError(f"{pattern}: expected a brace range {{000..099}} or list {{a,b}}, got {{{body}}}")
    return [out for item in items for out in expand(head + item + tail)]


def shard_paths(spec: str | Path) -> list[Path]:
    """The shards a pattern, a folder or a .tar file names; a clear error for a missing one."""
    spec = str(spec)
    if Path(spec).is_dir():
        paths = sorted(Path(spec).glob("*.tar"))
        if not paths:
            raise DocumentError(f"{spec}: expected a folder of .tar shards, got none")
        return paths
    paths = [Path(p) for p in expand(spec)]
    if missing := [p for p in paths if not p.is_file()]:
        raise MissingFileError(f"{spec}: expected {len(paths)} shard file(s), {len(missing)} missing, "
                                f"first {missing[0]}")
    return paths


def _index(path: Path) -> tuple[list[str], np.ndarray]:
    """(keys, (n, 5) int64 rows: image offset, image size, text offset, text size, text is json) of a shard."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": uncompressed, so members can be read by offset
            for info in tar:
                m = KEY.match(info.name) if info.isfile() else None
                if m is not None:
                    samples.setdefault(m.group(1), {})[m.group(2).lower()] = (info.offset_data, info.size)
    except tarfile.ReadError as e:
        raise DocumentError(f"{path}: expected an uncompressed tar shard, got one tarfile cannot read ({e}); "
                            "compressed shards cannot be read by offset: decompress them") from e
    rows = np.zeros((len(samples), 5), dtype=np.int64)
    for n, (key, members) in enumerate(samples.items()):
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        text = next(((members[e], e == "json") for e in TEXT_EXTS if e in members), None)
        if image is None or text is None:
            raise DocumentError(f"{path}, sample {key!r}: expected an image member ({', '.join(IMAGE_EXTS)}) and "
                                f"a .txt or .json caption, got members {sorted(members)}")
        rows[n] = (*image, *text[0], text[1])
    return list(samples), rows


class TarShards(LazyDocuments):
    def __init__(self, spec: str | Path):
        self.spec, self.paths = str(spec), shard_paths(spec)
        keys, rows, shard = [], [], []
        for s, path in enumerate(self.paths):
            k, r = _index(path)
            keys.append(np.array([key.encode() for key in k], dtype=bytes))
            rows.append(r)
            shard.append(np.full(len(k), s, dtype=np.int32))
        self.keys = np.concatenate(keys) if keys else np.array([], dtype=bytes)
        self.rows, self.shard = np.concatenate(rows), np.concatenate(shard)
        self._files: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.rows)

    def document(self, i: int) -> Document:
        key = self.keys[i].decode()
        where = f"{self.paths[self.shard[i]].name}, sample {key!r}"
        image_at, image_size, text_at, text_size, is_json = self.rows[i]
        try:
            image = _decode(io.BytesIO(self._read(i, image_at, image_size)), key, "image", "image")
            caption = self._caption(i, text_at, text_size, bool(is_json))
        except _Invalid as e:
            raise DocumentError(f"{self.spec}: {where}, {e.where}: {e.msg}") from e.__cause__
        return Document([Segment("image", media=image), Segment("text", text=caption)], key, origin=where)

    def texts(self) -> Iterator[str]:
        for i in range(len(self)):
            _, _, text_at, text_size, is_json = self.rows[i]
            try:
                yield self._caption(i, text_at, text_size, bool(is_json))
            except _Invalid as e:
                key = self.keys[i].decode()
                raise DocumentError(f"{self.spec}: {self.paths[self.shard[i]].name}, sample {key!r}, {e.where}: "
                                    f"{e.msg}") from e.__cause__

    def _caption(self, i: int, at: int, size: int, is_json: bool) -> str:
        raw = self._read(i, at, size)
        try:
            text = raw.decode("utf-8")
            if not is_json:
                return text.strip()
            record = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Invalid("json" if is_json else "txt", f"expected UTF-8 {'JSON' if is_json else 'text'}, "
                                                         f"got unreadable bytes ({e})") from e
        caption = next((record[f] for f in ("caption", "text") if isinstance(record, dict)
                        and isinstance(record.get(f), str)), None)
        if caption is None:
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise _Invalid("json", f"expected an object with a 'caption' or 'text' string (or a .txt member), got "
                                   f"the fields {fields}")
        return caption.strip()

    def _read(self, i: int, at: int, size: int) -> bytes:
        s = int(self.shard[i])
        if self._pid != os.getpid():  # a forked worker may use the parent's descriptors (pread), but not close them
            self._files, self._pid = {}, os.getpid()
        if s not in self._files:
            if len(self._files) >= MAX_OPEN:
                os.close(self._files.pop(next(iter(self._files))))
            self._files[s] = os.open(self.paths[s], os.O_RDONLY)
        return os.pread(self._files[s], int(size), int(at))

    def __getstate__(self) -> dict:  # pickled to a spawned worker: descriptors do not travel
        return {**self.__dict__, "_files": {}}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._files.values():
                os.close(fd)

