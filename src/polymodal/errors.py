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


def check_number(name: str, value: Any, *, integer: bool = False, above: float | None = None,
                 at_least: float | None = None, below: float | None = None, at_most: float | None = None,
                 error: type = InputError) -> Any:
    """`value` if it is a finite number (an integer if asked; never a bool) within the bounds given, else
    `error` naming the value. NaN fails every comparison, so `not value > 0` catches it where `value <= 0`
    would let it through."""
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
    return value


def check_pixel_values(pixel_values: Any, channels: int, size: int, batch: str = "num_images") -> None:
    """A clear error unless pixel_values is (batch, channels, size, size), the batch dimension named `batch`."""
    expected = (channels, size, size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise InputError(f"pixel_values must be ({batch}, {', '.join(map(str, expected))}), "
                         f"got {tuple(pixel_values.shape)}")
