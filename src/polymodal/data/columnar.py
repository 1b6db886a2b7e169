"""Hugging Face `datasets` folders (`Dataset.save_to_disk`) and parquet files, read with pyarrow.

Each row is a conversation record (`data/conversations.py`) in the LLaVA layout (`conversations`, `image`)
or the messages layout (`messages`, `images`), as the hub's VLM sets ship (LLaVA-OneVision-Data, TRL's
llava-instruct-mix). An image column holds what `datasets.Image()` stores, `{"bytes": ..., "path": ...}`:
the bytes are decoded, or, where a row holds only a path, the file is read (relative to the folder; under
strict_paths it must stay inside). Audio comes the same way (16-bit mono wav bytes); a video is a list of
frame images. A `save_to_disk` folder is memory-mapped (its Arrow files as they lie on disk), so rows are
read from the page cache when indexed; a parquet file is decompressed into memory whole (its images stay
encoded), so for sets larger than memory use a datasets folder or tar shards.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from polymodal.data.conversations import conversation_document
from polymodal.data.documents import Document, DocumentError, _decode, _Invalid, _load, _media_path, _type
from polymodal.data.lazy import LazyDocuments

BATCH_ROWS = 256  # rows converted to Python at a time while streaming texts


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError("reading a datasets folder or a parquet file needs pyarrow: "
                          "pip install 'polymodal[data]'") from e
    return pyarrow


class TableDocuments(LazyDocuments):
    """The rows of an Arrow table as documents, each decoded when indexed."""

    def __init__(self, table, source: Path, strict_paths: bool):
        self.table, self.source, self.strict_paths = table, source, strict_paths
        self.root = source if source.is_dir() else source.parent

    @classmethod
    def from_folder(cls, folder: Path, strict_paths: bool = False) -> "TableDocuments":
        pa = _pyarrow()
        if (folder / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file())
            raise DocumentError(f"{folder} holds the splits {', '.join(splits)} (a DatasetDict): give one split's "
                                f"folder, e.g. {folder / splits[0]}" if splits else f"{folder} holds no split")
        state = json.loads((folder / "state.json").read_text())
        files = [folder / f["filename"] for f in state.get("_data_files", [])]
        if not files or not all(f.is_file() for f in files):
            missing = next((f.name for f in files if not f.is_file()), "any data file")
            raise DocumentError(f"{folder}: expected the Arrow files its state.json lists, got no {missing}")
        tables = [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files]
        return cls(pa.concat_tables(tables) if len(tables) > 1 else tables[0], folder, strict_paths)

    @classmethod
    def from_parquet(cls, path: Path, strict_paths: bool = False) -> "TableDocuments":
        pa = _pyarrow()
        try:
            table = pa.parquet.read_table(str(path), memory_map=True)
        except pa.ArrowException as e:
            raise DocumentError(f"{path}: expected a parquet file, got one pyarrow cannot read ({e})") from e
        return cls(table, path, strict_paths)

    def __len__(self) -> int:
        return self.table.num_rows

    def document(self, i: int) -> Document:
        return self._parse(self.table.slice(i, 1).to_pylist()[0], i, decode=True)

    def texts(self) -> Iterator[str]:
        row = 0
        for batch in self.table.to_batches(max_chunksize=BATCH_ROWS):
            for record in batch.to_pylist():
                yield from self._parse(record, row, decode=False).texts
                row += 1

    def _parse(self, record: dict, row: int, decode: bool) -> Document:
        def resolve(kind: str, value: Any, where: str):
            if kind == "video":
                if not isinstance(value, list) or not value:
                    raise _Invalid(where, f"expected a non-empty list of frame images, got {_type(value)}")
                frames = [self._medium("image", v, f"{where}[{j}]", decode) for j, v in enumerate(value)]
                return (frames if decode else None), None
            return self._medium(kind, value, where, decode), None

        try:
            doc = conversation_document(record, resolve)
        except _Invalid as e:
            raise DocumentError(f"{self.source}, row {row}, {e.where}: {e.msg}") from e.__cause__
        doc.origin = f"row {row}"
        return doc

    def _medium(self, kind: str, value: Any, where: str, decode: bool):
        if isinstance(value, dict) and value.get("bytes") is not None:
            data = value["bytes"]
            return _decode(io.BytesIO(data), value.get("path") or where, kind, where) if decode else None
        path = value.get("path") if isinstance(value, dict) else value
        if not isinstance(path, str):
            raise _Invalid(where, f"expected an {kind} ({{'bytes', 'path'}} as datasets stores it, or a path), "
                                  f"got {_type(value)}")
        path = _media_path(self.root, path, where, self.strict_paths)
        return _load(path, kind, where) if decode else None
