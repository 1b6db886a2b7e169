"""Safetensors weight files, read one tensor at a time and written one tensor at a time.

`Weights` opens a checkpoint's files (model.safetensors, or the shards HF's model.safetensors.index.json
lists), their headers checked by `safetensors.safe_open`, and maps each copy-on-write: a tensor read is a view
of the mapped file, so nothing is read before it is asked for (a write to it never reaches the file), and each
one is checked as it is read (a float tensor, every value finite). Tensors stored back to back (a layer's
gate_proj and up_proj) are read as one view, so a fused weight need not be copied. Once a copy is all the model keeps (a fused or cast tensor), `release` drops the file's pages of
the source from this process, so the file does not count twice. `write_file` writes the safetensors
format (8-byte header length, JSON header, raw bytes) straight from each tensor's memory, and
`write_weights` splits above `max_shard_size` into HF's layout (`model-00001-of-00002.safetensors` + index).
Unreadable files (truncated, corrupt header, a bad index) are a `CheckpointError` naming the file.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import re
import struct
import sys
import threading
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from polymodal.errors import CheckpointError, InputError, MissingFileError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARDED, SHARDED_MODEL = "sharded", "model/"  # a training checkpoint's shards (train/checkpoint.py), its model keys
NOT_WEIGHTS = ("optimizer.safetensors", "adapter_model.safetensors")  # beside weights in checkpoints, never weights
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
          torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
FROM_NAME = {name: dtype for dtype, name in DTYPES.items()}
MADV_DONTNEED = 4  # linux/mman.h
SIZE_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}  # HF's units


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated, empty or corrupt one is a CheckpointError naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        size = path.stat().st_size if path.is_file() else 0
        raise CheckpointError(f"{path} is not a readable safetensors file ({size} bytes; {e}): it may be "
                              "truncated or corrupt") from e


def _weight_map(directory: Path) -> dict[str, str]:
    """The 'weight_map' (tensor name -> shard file name) of the directory's model.safetensors.index.json."""
    path = directory / INDEX
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path} must hold a non-empty 'weight_map' of tensor name -> shard file name")
    return weight_map


def _shards(directory: Path) -> list[Path]:
    """The shard files a model.safetensors.index.json lists, each checked to lie inside `directory`."""
    path, weight_map = directory / INDEX, _weight_map(directory)
    root = directory.resolve()
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = (directory / name).resolve()
        if shard.parent != root:
            raise CheckpointError(f"{path} lists shard {name!r}, which lies outside {directory}; shards must be "
                                  "files in the checkpoint folder itself")
        if not shard.is_file():
            raise CheckpointError(f"{path} lists shard {name}, which is missing")
        shards.append(shard)
    return shards


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights: model.safetensors, else the shards of its index,
    else its one *.safetensors file. Otherwise a MissingFileError saying what the folder holds instead (pickles
    are named and refused, never read)."""
    if (directory / WEIGHTS).exists():  # first, as HF does: a save over a sharded folder leaves its index
        return [directory / WEIGHTS]
    if (directory / INDEX).exists():
        return _shards(directory)
    present = sorted(p.name for p in directory.glob("*.safetensors"))
    singles = [name for name in present if name not in NOT_WEIGHTS]
    if len(singles) == 1:
        return [directory / singles[0]]
    pickles = [n for n in PICKLE_NAMES if (directory / n).exists()]
    why = [f"only {', '.join(pickles)}: pickles, which polymodal never loads, since unpickling a file can run "
           "arbitrary code; convert them with a tool you trust, e.g. transformers' "
           "save_pretrained(safe_serialization=True)"] if pickles else []
    if len(singles) > 1:
        why.append(f"{', '.join(singles)}: several loose *.safetensors files and no index saying which hold the model")
    elif present:
        why.append(f"{', '.join(present)} holds no model weights")
    raise MissingFileError(f"{directory} has no weights: no {WEIGHTS} or {INDEX}" + "".join(f" ({w})" for w in why))


def check_weight(tensor: torch.Tensor, name: str, path: Path) -> None:
    """A CheckpointError unless `tensor` is a float tensor with every value finite. One pass over the data
    with no temporary: a sum in the tensor's own dtype, which any NaN or inf makes non-finite; only a sum that
    is not finite (a bad tensor, or finite values past the dtype's range: float16's 65504) is then looked at value
    by value. float8 has no sum or isfinite here: it is widened first."""
    if not tensor.is_floating_point():
        kind = "complex numbers" if tensor.is_complex() else "integers or booleans"
        raise CheckpointError(f"{path}: tensor {name} is {tensor.dtype}, where float weights belong; the file "
                              f"holds {kind} in a weight's place")
    values = tensor if tensor.element_size() > 1 else tensor.float()
    if tensor.numel() == 0 or math.isfinite(torch.sum(values)):
        return
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise CheckpointError(f"{path}: tensor {name} holds {bad:,} non-finite values (NaN or inf) among "
                              f"{tensor.numel():,}: the file is corrupt or the weights diverged")


def open_checked(path: Path):
    """`safe_open` of one file, which checks its header against the file's size without reading the data;
    a CheckpointError naming the file when it is unreadable (truncated, or its header overwritten)."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        size = path.stat().st_size if path.is_file() else 0
        raise CheckpointError(f"{path} is not a readable safetensors file ({size} bytes; {e}): its header "
                              "may be overwritten, or the file truncated") from e


class Weights:
    """The tensors of a checkpoint directory, each read when asked for (see the module docstring)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.where: dict[str, Path] = {}
        self._files: dict[Path, object] = {}
        self._maps: dict[Path, tuple[mmap.mmap, int, dict]] = {}
        self._lock = threading.RLock()  # the loader's threads ask for tensors of the same files at once
        for path in weight_files(self.directory):
            for name in self._open(path).keys():
                if name in self.where:  # which copy HF would read depends on the index: refuse, as the files disagree
                    raise CheckpointError(f"{self.directory}: tensor {name} is stored twice, in "
                                          f"{self.where[name].name} and in {path.name}")
                self.where[name] = path
        if not (self.directory / WEIGHTS).exists() and (self.directory / INDEX).exists():
            self._check_index()

    def _check_index(self) -> None:
        """Each tensor the index lists lies in the shard it names (else the shard is damaged, or from another
        save, and the model would miss the tensor or read another one)."""
        for name, shard in _weight_map(self.directory).items():
            where = self.where.get(name)
            if where is None or where.resolve() != (self.directory / shard).resolve():
                found = f" (it is in {where.name})" if where is not None else ""
                raise CheckpointError(f"{self.directory / INDEX} lists tensor {name} in {shard}, which does not hold "
                                      f"it{found}: the shard is damaged or from another save")

    def _open(self, path: Path):
        with self._lock:
            if path not in self._files:
                self._files[path] = open_checked(path)
            return self._files[path]

    def _mapped(self, path: Path) -> tuple[mmap.mmap, int, dict]:
        """The file mapped copy-on-write (a write to a tensor of it never reaches the file), where its data
        begins, and its header (checked by `safe_open` first)."""
        with self._lock:
            if path not in self._maps:
                self._open(path)
                with open(path, "rb") as f:
                    length = struct.unpack("<Q", f.read(8))[0]
                    header = json.loads(f.read(length))
                    self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), 8 + length, header
            return self._maps[path]

    def keys(self) -> list[str]:
        return list(self.where)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        """(shape, dtype) from the header, without reading the data; dtype None for a type torch lacks here."""
        view = self._open(self.where[name]).get_slice(name)
        return tuple(view.get_shape()), FROM_NAME.get(view.get_dtype())

    def float_dtype(self) -> torch.dtype | None:
        """The dtype of the first float tensor (what HF's dtype="auto" keeps)."""
        for name in self.where:
            dtype = self.info(name)[1]
            if dtype is not None and dtype.is_floating_point:
                return dtype
        return None

    def read(self, name: str) -> torch.Tensor:
        """A view of the mapped file, checked by `check_weight`."""
        path = self.where[name]
        tensor = self._slice([name])
        if tensor is None:  # a scalar, an empty or misaligned tensor, a type torch lacks here: safetensors' read
            try:
                tensor = self._open(path).get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{path}: cannot read tensor {name} ({e}): the file may be truncated or "
                                      "corrupt") from e
        check_weight(tensor, name, path)
        return tensor

    def joined(self, names: list[str], dtype: torch.dtype) -> torch.Tensor | None:
        """`names` joined along dim 0 as one view of the mapped file, each part checked, when they are stored
        as `dtype` back to back in this order in one file (as safetensors writes a layer's gate_proj and
        up_proj); else None. One name: a view of it, when it is stored as `dtype`."""
        whole = self._slice(names)
        if whole is None or whole.dtype != dtype:
            return None
        path = self.where[names[0]]
        header = self._mapped(path)[2]
        for name, part in zip(names, whole.split([header[n]["shape"][0] for n in names])):
            check_weight(part, name, path)
        return whole

    def _slice(self, names: list[str]) -> torch.Tensor | None:
        """`names` joined along dim 0 as one view of their file's mapping (unchecked), when they lie back to back
        in this order in one file with one dtype and the same trailing shape; else None."""
        path = self.where[names[0]]
        if any(self.where[n] != path for n in names):
            return None
        mapped, start, header = self._mapped(path)
        entries = [header[n] for n in names]
        shapes, dtype = [entry["shape"] for entry in entries], FROM_NAME.get(entries[0]["dtype"])
        begin, end = entries[0]["data_offsets"][0], entries[-1]["data_offsets"][1]
        if (dtype is None or end == begin or (start + begin) % dtype.itemsize
                or any(entry["dtype"] != entries[0]["dtype"] for entry in entries)
                or any(not shape or shape[1:] != shapes[0][1:] for shape in shapes)
                or any(a["data_offsets"][1] != b["data_offsets"][0] for a, b in zip(entries, entries[1:]))):
            return None
        whole = torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
        return whole.view(sum(shape[0] for shape in shapes), *shapes[0][1:])

    @staticmethod
    def release(tensor: torch.Tensor) -> None:
        """Drops the whole pages of `tensor`'s memory from this process: call it on a tensor read here once
        only a copy of it is kept. Pages of a private file mapping that was never written fault back in
        from the file if read again."""
        _advise(tensor, MADV_DONTNEED)


_LIBC = ctypes.CDLL(None, use_errno=True)


def _advise(tensor: torch.Tensor, advice: int) -> None:
    """madvise over the pages wholly inside `tensor`'s storage (Linux; a no-op elsewhere)."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return
    begin, end = tensor.data_ptr(), tensor.data_ptr() + tensor.untyped_storage().nbytes()
    start, stop = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if stop > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), advice)


def _raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of `tensor` without a copy (a GPU or strided tensor: one copy of this tensor alone)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.contiguous().cpu()
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_file(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file, written tensor by tensor from each tensor's own memory (safetensors' `save_file`
    first copies every tensor into one buffer). Widest dtypes first, as `save_file`, so each stays aligned."""
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise InputError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(_raw(tensors[name]))


def shard_size(max_shard_size: int | str) -> int:
    """Bytes from an int or HF's strings ("5GB" = 5 * 10**9, "2GiB" = 2 * 2**30, "500MB", ...)."""
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool) and max_shard_size > 0:
        return max_shard_size
    if isinstance(max_shard_size, str):
        text = max_shard_size.strip().upper()
        if text.isdigit() and int(text) > 0:
            return int(text)
        for unit, scale in SIZE_UNITS.items():
            number = text[:-len(unit)].strip()
            if text.endswith(unit) and number.isdigit() and int(number) > 0:
                return int(number) * scale
    raise InputError(f"max_shard_size must be a positive number of bytes or a size like '5GB' or '500MiB', "
                     f"got {max_shard_size!r}")


def plan_shards(sizes: Mapping[str, int], max_shard_size: int | str) -> list[list[str]]:
    """Tensor names grouped into shards of at most `max_shard_size` bytes, in order (a tensor larger than the
    limit alone in its shard); one group when everything fits."""
    limit = shard_size(max_shard_size)
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def is_weight_file(name: str) -> bool:
    """Whether a file of that name holds (or indexes) a checkpoint's weights as `write_weights` writes them."""
    return name in (WEIGHTS, INDEX) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None


def write_index(directory: Path, shards: list[list[str]], total_size: int) -> None:
    weight_map = {name: shard_name(i, len(shards)) for i, names in enumerate(shards) for name in names}
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_weights(directory: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  max_shard_size: int | str = "50GB") -> None:
    """model.safetensors, or above `max_shard_size` bytes HF's shards and model.safetensors.index.json."""
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    shards = plan_shards(sizes, max_shard_size)
    if len(shards) == 1:
        write_file(directory / WEIGHTS, tensors, metadata)
        return
    for i, names in enumerate(shards):
        write_file(directory / shard_name(i, len(shards)), {k: tensors[k] for k in names}, metadata)
    write_index(directory, shards, sum(sizes.values()))
