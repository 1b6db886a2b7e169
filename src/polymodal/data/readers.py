"""`read_documents(path)`: every data source `--data` takes, told apart by what the path holds.

  polymodal JSONL       lines of {"segments": [...]} (`data/documents.py`)
  conversations         a JSON list, or JSON Lines, of LLaVA `conversations` or OpenAI-style `messages`
                        records with their `image`/`images`/`audios`/`videos` paths (`data/conversations.py`)
  datasets folder       a `Dataset.save_to_disk` folder of conversation rows (`data/columnar.py`)
  parquet               a .parquet file of conversation rows
  tar shards            WebDataset image-caption shards: `a-{000..099}.tar`, a folder of .tar, a .tar
                        (`data/shards.py`)

The kind is decided by the path (folder contents, extension, a brace pattern) and, for a JSON file, by its
first record's fields, so no flag names it. Files of JSON give a list of documents whose media, with
load_media=False, are read later by `with_media`; tables and shards give a `LazyDocuments` that reads
(and decodes) a document when indexed. Media paths are relative to the file's folder; strict_paths refuses
any that leads out of it. Every problem names the file, the record (line, [index], row or sample) and the
field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from polymodal.data.columnar import TableDocuments
from polymodal.data.conversations import conversation_document, is_conversation
from polymodal.data.documents import Document, DocumentError, _Invalid, _load, _media_path, _type, iter_jsonl
from polymodal.data.shards import BRACE, TarShards
from polymodal.errors import MissingFileError


class DataNotFoundError(MissingFileError):
    """A data path that names nothing."""


def data_kind(path: str | Path) -> str:
    """"jsonl", "conversations", "datasets", "parquet" or "shards"; a clear error when it is none of them."""
    p = Path(path)
    if p.is_dir():
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return "datasets"
        if any(p.glob("*.tar")):
            return "shards"
        raise DocumentError(f"expected a datasets folder (save_to_disk: state.json) or a folder of .tar shards, "
                            f"got {str(path)!r} (a folder with neither)")
    if not p.exists() and BRACE.search(str(path)):
        return "shards"
    if not p.is_file():
        raise DataNotFoundError(f"expected a data file (JSONL, JSON, parquet, .tar) or folder, got {str(path)!r} "
                                "(no such file)")
    if p.suffix == ".tar":
        return "shards"
    if p.suffix == ".parquet":
        return "parquet"
    first = _first_record(p)
    if isinstance(first, list) or is_conversation(first):
        return "conversations"
    return "jsonl"  # polymodal's own, or an error iter_jsonl names with the line


def read_documents(path: str | Path, *, strict_paths: bool = False, load_media: bool = True) -> Sequence[Document]:
    """The documents of any data source above (see the module docstring)."""
    kind = data_kind(path)
    if kind == "shards":
        return TarShards(path)
    if kind == "datasets":
        return TableDocuments.from_folder(Path(path), strict_paths)
    if kind == "parquet":
        return TableDocuments.from_parquet(Path(path), strict_paths)
    if kind == "jsonl":
        return list(iter_jsonl(path, load_media, strict_paths))
    return list(_conversations(Path(path), strict_paths, load_media))


def read_flagged(flag: str, path: str | Path, *, strict_paths: bool = False) -> Sequence[Document]:
    """`read_documents(path)` with media unread (each batch loads its own), for a command-line flag: a path
    that holds no data, or no documents, is an error naming the flag."""
    try:
        data_kind(path)
    except (DataNotFoundError, DocumentError) as e:
        raise type(e)(f"{flag} {e}") from e
    docs = read_documents(path, strict_paths=strict_paths, load_media=False)
    if not len(docs):
        raise DocumentError(f"{flag} {path} holds no documents")
    return docs


def _first_record(path: Path) -> Any:
    """The parsed first JSON Lines record; a list if the file is one JSON array; None if it is neither."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                break
        else:
            return None
    if raw.lstrip().startswith(b"["):
        return []
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _conversations(path: Path, strict_paths: bool, load_media: bool) -> Iterator[Document]:
    """A JSON list (records named record [i]) or JSON Lines (records named by line) of conversation records."""
    def resolve(kind: str, value: Any, where: str):
        if kind != "video":
            if not isinstance(value, str):
                raise _Invalid(where, f"expected a file path string, got {_type(value)}")
            p = _media_path(path.parent, value, where, strict_paths)
            return (_load(p, kind, where) if load_media else None), p
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            given = f"the file {value!r} (video files are not decoded)" if isinstance(value, str) else _type(value)
            raise _Invalid(where, f"expected a non-empty list of frame image paths, got {given}")
        paths = [_media_path(path.parent, v, f"{where}[{j}]", strict_paths) for j, v in enumerate(value)]
        return ([_load(p, "image", f"{where}[{j}]") for j, p in enumerate(paths)] if load_media else None), paths

    for place, record, line in _records(path):
        try:
            doc = conversation_document(record, resolve)
        except _Invalid as e:
            raise DocumentError(f"{path}, {place}, {e.where}: {e.msg}") from e.__cause__
        doc.line, doc.origin = line, None if line else place
        yield doc


def _records(path: Path) -> Iterator[tuple[str, Any, int | None]]:
    """(place, record, line or None) of a JSON list file or a JSON Lines file."""
    if isinstance(_first_record(path), list):
        try:
            records = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DocumentError(f"{path}: expected a JSON list of records, got malformed JSON ({e})") from e
        if not isinstance(records, list):
            raise DocumentError(f"{path}: expected a JSON list of records, got {_type(records)}")
        yield from ((f"record [{i}]", record, None) for i, record in enumerate(records))
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield f"line {n}", json.loads(raw), n
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DocumentError(f"{path}, line {n}, document: expected one JSON object, got malformed JSON "
                                    f"({e})") from e
