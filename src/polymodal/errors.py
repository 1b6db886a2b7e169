"""polymodal's own errors, and the one check every number a user gives goes through.

Every mistake polymodal can name is a `PolymodalError` with a one-line message saying what was expected
and what was given; the subclasses also derive from the built-in type that fits (ValueError, ...), so
`except ValueError` keeps catching them.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


class PolymodalError(Exception):
    """Base of every error polymodal raises for a bad input, file or setting."""


class ConfigError(PolymodalError, ValueError):
    """A config that cannot describe a model: unknown option, bad choice, inconsistent shape."""


class InputError(PolymodalError, ValueError):
    """A bad argument to a model or to generate: a wrong dtype, shape, token id or setting."""


class DocumentError(PolymodalError, ValueError):
    """A document that does not follow the format or does not fit the model; names the file and line if any."""


class CheckpointError(PolymodalError, ValueError):
    """A checkpoint directory that cannot be read (corrupt or truncated files, a bad index) or written."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong Python type (a string where a list is expected, a module that is no Linear)."""


class MissingFileError(PolymodalError, FileNotFoundError):
    """A file or directory the user named that does not exist, or lacks the file polymodal reads from it."""


class ExistingFileError(PolymodalError, FileExistsError):
    """A file or directory polymodal would overwrite without being asked."""


class PathKindError(PolymodalError, IsADirectoryError, NotADirectoryError):
    """A directory where a file is expected, or a file where a directory is."""


class UnknownNameError(PolymodalError, KeyError):
    """An unknown preset or token name. `str()` is the message itself (KeyError's would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def check_number(name: str, value: Any, *, integer: bool = False, above: float | None = None,
                 at_least: float | None = None, below: float | None = None, at_most: float | None = None,
                 error: type = InputError) -> Any:
    """`value` as a Python int or float (a numpy scalar, which JSON cannot write, made plain) if it is a finite
    number (an integer if asked; never a bool) within the bounds given, else `error` naming the value. NaN fails
    every comparison, so `not value > 0` catches it where `value <= 0` would let it through."""
    kind = "an integer" if integer else "a finite number"
    bounds = [f"> {above}" if above is not None else "", f">= {at_least}" if at_least is not None else "",
              f"< {below}" if below is not None else "", f"<= {at_most}" if at_most is not None else ""]
    wanted = " and ".join(b for b in bounds if b)
    ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (below is None or value < below) and (at_most is None or value <= at_most)
    if not ok:
        given = f"{value!r} ({type(value).__name__})" if not isinstance(value, numbers.Real) else repr(value)
        raise error(f"{name} must be {kind}{' ' + wanted if wanted else ''}, got {given}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_text(text: str, name: str = "text", error: type = InputError) -> str:
    """`text` if it is a str that UTF-8 can encode; a lone surrogate (from JSON's "\\ud800" or undecodable
    command-line bytes) would reach the tokenizer and fail there with no word of where."""
    if not isinstance(text, str):
        raise InputTypeError(f"{name} must be a string, got {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise error(f"{name} holds a lone surrogate {text[e.start]!r} at character {e.start + 1}: expected "
                        "valid Unicode text") from e
    return text


def check_ids(input_ids: Any, name: str = "input_ids") -> None:
    """A clear error unless `input_ids` is a (batch, seq) tensor of integer token ids."""
    import torch

    if not isinstance(input_ids, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise InputError(f"{name} must hold integer token ids (torch.long or int32), got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise InputError(f"{name} must be (batch, seq), got shape {tuple(input_ids.shape)}")


def check_mask(attention_mask: Any, shape: tuple[int, ...], name: str = "attention_mask") -> None:
    """A clear error unless the mask is a tensor of `shape` holding only 0 (padding) and 1 (tokens): a 2 or a
    0.5 would be read as 1 without a word."""
    import torch

    if not isinstance(attention_mask, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(shape):
        raise InputError(f"{name} must have the shape of the input (batch, seq) = {tuple(shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        odd = attention_mask[(attention_mask != 0) & (attention_mask != 1)].unique()[:4].tolist()
        raise InputError(f"{name} must hold only 0 (padding) and 1 (tokens), got {odd}")


def check_tensors(**named: Any) -> None:
    """A clear error unless each value given (not None) is a tensor, or a list of tensors."""
    import torch

    for name, value in named.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(isinstance(v, torch.Tensor) for v in items):
            kind = "a torch.Tensor or a list of them" if name.endswith("videos") else "a torch.Tensor"
            raise InputTypeError(f"{name} must be {kind}, got {type(value).__name__}")


def check_media(name: str, values: Any, shape: tuple[int | str, ...], what: str = "") -> None:
    """A clear error unless `values` is a floating-point tensor of `shape` (a str entry: any size, named so in
    the message) holding only finite numbers: NaN or inf pixels or audio features would reach the encoder and
    come out as NaN logits, then pad tokens, with no word."""
    import torch  # errors.py sits below every layer; torch is only needed once a tensor is checked

    if not isinstance(values, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    wanted = f"({', '.join(map(str, shape))})"
    if values.dim() != len(shape) or any(isinstance(w, int) and g != w for g, w in zip(values.shape, shape)):
        raise InputError(f"{name} must be {wanted}{' ' + what if what else ''}, got {tuple(values.shape)}")
    check_finite(name, values)


def check_finite(name: str, values: Any) -> None:
    """A clear error unless the tensor `values` is floating point and holds only finite numbers."""
    import torch

    if not values.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {values.dtype}")
    if values.numel() and not bool(torch.isfinite(values).all()):
        bad = values[~torch.isfinite(values)]
        raise InputError(f"{name} must hold finite numbers, got {bad.numel()} NaN or infinite values "
                         f"(first: {bad[0].item()})")


def check_pixel_values(pixel_values: Any, channels: int, size: int, batch: str = "num_images",
                       name: str = "pixel_values") -> None:
    """A clear error unless pixel_values is a finite float (batch, channels, size, size) tensor, the batch
    dimension named `batch`."""
    check_media(name, pixel_values, (batch, channels, size, size))
