"""Named configs: one dict from preset name to a function returning the config, the union of every family's
`presets` (`families.FAMILIES`); a name two families both claim is an error at import."""

from __future__ import annotations

from typing import Callable

from polymodal.config import Config
from polymodal.errors import UnknownNameError
from polymodal.families import merged


PRESETS: dict[str, Callable[[], Config]] = merged("presets")


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise UnknownNameError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]()
