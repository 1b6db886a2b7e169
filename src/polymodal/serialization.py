"""Safe, atomic model files: safetensors weights + config.json, never pickles.

A save writes everything into a temporary sibling directory, fsyncs it, then swaps it into place,
so an interrupted save leaves the previous files intact (or the new ones complete), never a mix.
Saving into an existing checkpoint folder keeps every file the save does not write (optimizer and
trainer state, a tokenizer, a README, subfolders): they are hard-linked into the new folder before the
swap. The swap is one `renameat2(RENAME_EXCHANGE)` system call on Linux, so there is no moment without
the folder; elsewhere it is two renames. A symlinked target is resolved first: the link stays, the
folder it points to is replaced. Unreadable weights (truncated, corrupt, a bad shard index) are a
`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from polymodal.errors import CheckpointError, ExistingFileError
from polymodal.weights import WEIGHTS, is_weight_file, read_safetensors, weight_files, write_file  # noqa: F401 (WEIGHTS: re-exported)

RENAME_EXCHANGE = 2  # linux/fs.h


def _fresh(parent: Path, prefix: str, make: Callable[[Path], object]):
    """A new, uniquely named path in `parent` made by `make`. Not tempfile's mkdtemp/mkstemp: they make it
    owner-only (0700/0600), and the swapped-in checkpoint would keep that instead of the user's umask."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            return path, make(path)
        except FileExistsError:
            continue
    raise ExistingFileError(f"no free temporary name {prefix}* in {parent}")


def umask() -> int:
    """The process's umask, read without changing it where the OS allows (os.umask sets it as it reads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2); False where the OS or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_cwd = -100
    if libc.renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: no exchange on this file system
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _keep_others(old: Path, new: Path) -> None:
    """Everything in `old` that `new` lacks, hard-linked (or copied) into `new`; but when `new` holds weights,
    none of the old weight files: a sharded save over one model.safetensors (or the reverse) leaves no stale
    weights that `weight_files` would find first."""
    new_weights = any(is_weight_file(entry.name) for entry in new.iterdir())
    for entry in old.iterdir():
        dest = new / entry.name
        if dest.exists() or dest.is_symlink() or (new_weights and is_weight_file(entry.name)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dest, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), dest)
        else:
            _link_or_copy(str(entry), str(dest))


@contextlib.contextmanager
def atomic_directory(target: str | Path):
    """Yields a temporary directory; on success its files replace those of `target` of the same name, and
    every other file of `target` is kept. A target that is a file, or a directory holding anything but a
    checkpoint (no config.json), is refused first: it is a user's."""
    target = Path(os.path.realpath(target))
    if target.exists() and not (target.is_dir() and ((target / "config.json").is_file() or not any(target.iterdir()))):
        raise ExistingFileError(f"{target} exists and is not a checkpoint directory (a file, or a folder without "
                              "config.json): refusing to replace it; give a new or empty directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp, _ = _fresh(target.parent, f".{target.name}.tmp-", os.mkdir)  # 0777 less the umask
    except OSError as e:
        raise CheckpointError(f"cannot write {target}: {e.strerror} ({e.filename})") from e
    try:
        yield tmp
        if target.exists():
            _keep_others(target, tmp)
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if not target.exists():
            os.replace(tmp, target)
        elif _exchange(tmp, target):  # tmp now holds the old folder
            _keep_others(tmp, target)  # anything written into the old folder meanwhile
        else:
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            tmp = old
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a single file atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _fresh(path.parent, f".{path.name}.tmp-",
                     lambda p: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # less the umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """One safetensors file, written tensor by tensor (`weights.write_file`): no second copy in memory."""
    write_file(Path(path), state, metadata)


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, read whole (`Weights` reads them one at a time)."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(directory)):
        state.update(read_safetensors(path))
    return state


def check_fits(expected: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]], source: str | Path) -> None:
    """A CheckpointError naming every missing, unexpected or mis-shaped tensor (shapes by state-dict key)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k}: expected {tuple(expected[k])}, got {tuple(given[k])}"
              for k in expected if k in given and tuple(expected[k]) != tuple(given[k])]
    if missing or unexpected or shapes:
        parts = [f"checkpoint {source} does not fit the model config"]
        if missing:
            parts.append(f"missing {len(missing)} tensors: {missing[:10]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors: {unexpected[:10]}")
        if shapes:
            parts.append(f"wrong shapes: {shapes[:10]}")
        raise CheckpointError("; ".join(parts))


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Strict load of an in-memory state dict (`check_fits` first)."""
    check_fits({k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in state.items()}, source)
    model.load_state_dict(state, strict=True)
