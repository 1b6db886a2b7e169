"""Freezing as an explicit set of trainable parts (torchtune `DeepFusionModel`, nanoVLM)."""

from __future__ import annotations

from torch import nn

from polymodal.errors import ConfigError


def set_trainable(groups: dict[str, list[nn.Module | nn.Parameter | None]], parts: tuple[str, ...] | list[str]) -> None:
    """Train exactly the named groups of modules / parameters, freeze the others; None members
    (a part the config leaves out) are skipped. An unknown name is an error naming the valid ones."""
    unknown = sorted(set(parts) - set(groups))
    if unknown:
        raise ConfigError(f"unknown parts {unknown}; choose from {list(groups)}")
    for name, members in groups.items():
        for member in members:
            if member is not None:
                member.requires_grad_(name in parts)
