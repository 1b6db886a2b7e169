"""The benchmarks' one check that both sides of a row did the same work, before any figure is printed.

A ratio of two timings says something only when both sides wrote the same tokens (or as many, where the
tokens may rightly differ, as between float32 and int8 weights), under the same stop rule, in the mode the
row names. Each check raises `UnequalWork`, naming the side and the first row or request that differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class UnequalWork(AssertionError):
    """The two sides of a benchmark row did different work: their timings are not comparable."""


def same_tokens(what: str, outputs: Mapping[str, torch.Tensor | Sequence], reference: str | None = None) -> None:
    """Every output equal to the reference's (the first by default), token for token, row for row."""
    names = list(outputs)
    reference = reference or names[0]
    want = _rows(outputs[reference])
    for name in names:
        got = _rows(outputs[name])
        if len(got) != len(want):
            raise UnequalWork(f"{what}: {name} wrote {len(got)} rows, {reference} {len(want)}")
        for i, (a, b) in enumerate(zip(got, want)):
            if a != b:
                at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                raise UnequalWork(f"{what}: row {i} of {name} differs from {reference} at token {at} "
                                  f"({len(a)} vs {len(b)} tokens)")


def same_lengths(what: str, lengths: Mapping[str, Sequence[int]]) -> None:
    """As many tokens per row or request on every side (where the tokens themselves may rightly differ)."""
    (reference, want), *others = lengths.items()
    for name, got in others:
        if list(got) != list(want):
            bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b] or [min(len(got), len(want))]
            raise UnequalWork(f"{what}: {name} and {reference} wrote different numbers of tokens for "
                              f"{len(bad)} of {max(len(got), len(want))} rows/requests (first: #{bad[0]})")


def require(what: str, ok: bool, detail: str) -> None:
    """A named condition on how a side ran (its mode, its stop rule); UnequalWork with the detail if not met."""
    if not ok:
        raise UnequalWork(f"{what}: {detail}")


def _rows(x: torch.Tensor | Sequence) -> list[list]:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1, x.shape[-1]).tolist() if x.dim() else [[x.item()]]
    return [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in x]
