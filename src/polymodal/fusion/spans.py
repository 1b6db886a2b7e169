"""Media spans in a token stream, for the early-fusion core (`fusion/early.py`) and the image writer
(`fusion/writer.py`): where media go, checked against the media given, and the one scatter that puts them there.

A span rule is one of three (`Span`): a bare run of placeholders (PaliGemma, Fuyu, Chameleon's images),
`start placeholder* end` (Gemini's modalities), or `start`, a fixed number of tokens of any id, `end`
(KOSMOS-1, whose placeholder is the pad token). `find` reads them, vectorised, in row-major order (the
order media are given in); the checks name the placeholders found and the media given, before any compute.

Shapes: B batch, S tokens, N spans, T spanned tokens in all, D decoder width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polymodal.errors import InputError


@dataclass
class Spans:
    """Span k covers tokens starts[k] .. starts[k] + lengths[k] - 1 of row rows[k]; kinds[k] indexes the
    family's modalities. All (N,) long tensors, in row-major order."""

    rows: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    kinds: torch.Tensor

    def __len__(self) -> int:
        return self.rows.numel()

    def of(self, kind: int) -> Spans:
        keep = self.kinds == kind
        return Spans(self.rows[keep], self.starts[keep], self.lengths[keep], self.kinds[keep])

    def index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) rows and (T,) columns of every spanned token, span after span."""
        first = (self.lengths.cumsum(0) - self.lengths).repeat_interleave(self.lengths)  # each token's span start
        offset = torch.arange(int(self.lengths.sum()), device=self.rows.device) - first
        return self.rows.repeat_interleave(self.lengths), self.starts.repeat_interleave(self.lengths) + offset


@dataclass(frozen=True)
class Span:
    """Where one modality's media sit in input_ids."""

    blank: int  # the placeholder token a media embedding replaces, one per embedding
    wrap: tuple[int, int] | None = None  # (start, end) around each media; None: a bare run of blanks
    fixed: bool = False  # `start`, the media's tokens of any id, `end` (KOSMOS-1, whose blank is the pad token)
    names: tuple[str, str] = ("start", "end")  # the wrap tokens as errors name them

    @property
    def wrapped(self) -> bool:
        return self.wrap is not None


def closed_ends(spans: Spans, rules: list[Span]) -> torch.Tensor:
    """(N,) the position after each span's last token, its end token included where its rule wraps it: input_ids
    cut there (or before its start token) keep the span whole."""
    wrapped = torch.tensor([r.wrapped for r in rules], dtype=torch.long, device=spans.kinds.device)
    return spans.starts + spans.lengths + wrapped[spans.kinds]


def find(input_ids: torch.Tensor, rules: list[Span], names: list[str], *, fixed: tuple | None = None) -> Spans:
    """The spans of every rule (kinds index `rules`), in row-major order. The rules of one table are all bare
    (one rule), all wrapped around one blank, or one fixed rule, with `fixed` = the other arguments of
    `fixed_spans` (the media's key, tokens per media, how many were given, the context limit)."""
    if not rules:
        return runs(torch.zeros_like(input_ids, dtype=torch.bool))
    if rules[0].fixed:
        return fixed_spans(input_ids, rules[0], names[0], *fixed)
    if not rules[0].wrapped:
        return runs(input_ids == rules[0].blank)
    return wrapped_spans(input_ids, rules[0].blank, [r.wrap for r in rules], names)


def last_other(held: torch.Tensor) -> torch.Tensor:
    """(B, S): the position of the last token at or before each that is not held (-1: none)."""
    pos = torch.arange(held.shape[1], device=held.device).expand_as(held)
    return torch.where(held, -1, pos).cummax(1).values


def opened_runs(input_ids: torch.Tensor, begin: int, blank: int) -> Spans:
    """The runs of blanks that follow `begin` directly (blanks elsewhere are another rule's)."""
    held = input_ids == blank
    opener = last_other(held)
    return runs(held & (opener >= 0) & (input_ids.gather(1, opener.clamp(min=0)) == begin))


def fixed_spans(input_ids: torch.Tensor, rule: Span, name: str, key: str, length: int, given: int | None,
                limit: int) -> Spans:
    """Spans `start`, `length` tokens, `end`, checked before any compute against `given` media (None: none
    given) and the context `limit`: an image past the context is named as such, not as a cut span."""
    (start, end), (start_name, end_name) = rule.wrap, rule.names
    S = input_ids.shape[1]
    rows, starts = (input_ids == start).nonzero(as_tuple=True)  # row-major: order of appearance
    N = len(rows)
    if N != (given or 0):
        raise InputError(f"input_ids hold {N} {name}s ({start_name} tokens, id {start}) but {key} holds "
                         f"{given or 0} {name}s" + (" (none given)" if given is None else ""))
    ends = starts + length + 1  # where each span's end token must be
    if S > limit and (ends >= limit).any():
        past = [f"{name} {k} (row {int(rows[k])}, tokens {int(starts[k])}..{int(ends[k])})"
                for k in (ends >= limit).nonzero()[:, 0].tolist()]
        raise InputError(f"{', '.join(past[:5])}{' and more' if len(past) > 5 else ''} "
                         f"{'lies' if len(past) == 1 else 'lie'} past the context limit of max_seq_len={limit} "
                         f"tokens (the input has {S}); shorten the document or drop those {name}s")
    if (ends >= S).any():
        k = int((ends >= S).nonzero()[0, 0])
        raise InputError(f"{name} {k} (row {int(rows[k])}) starts at token {int(starts[k])} and needs tokens up to "
                         f"{int(ends[k])} ({start_name}, {length} placeholders, {end_name}), but the input ends at "
                         f"token {S - 1}: was it cut at the context limit?")
    wrong = (input_ids[rows, ends] != end).nonzero()[:, 0]
    if len(wrong):
        k = int(wrong[0])
        raise InputError(f"{name} {k} (row {int(rows[k])}, {start_name} at token {int(starts[k])}) needs {end_name} "
                         f"(id {end}) at token {int(ends[k])} after its {length} placeholders, got id "
                         f"{int(input_ids[rows[k], ends[k]])}")
    n_ends = int((input_ids == end).sum())
    if n_ends != N:
        raise InputError(f"input_ids hold {n_ends} {end_name} tokens for {N} {name}s; every {name} is "
                         f"{start_name}, {length} placeholders, {end_name}")
    return Spans(rows, starts + 1, torch.full_like(rows, length), torch.zeros_like(rows))


def runs(is_placeholder: torch.Tensor) -> Spans:
    """The maximal runs of True in (B, S): one span each."""
    off = torch.zeros_like(is_placeholder[:, :1])
    before = torch.cat([off, is_placeholder[:, :-1]], 1)
    after = torch.cat([is_placeholder[:, 1:], off], 1)
    rows, starts = (is_placeholder & ~before).nonzero(as_tuple=True)
    ends = (is_placeholder & ~after).nonzero(as_tuple=True)[1]  # the same runs, in the same order
    return Spans(rows, starts, ends - starts + 1, torch.zeros_like(rows))


def wrapped_spans(input_ids: torch.Tensor, placeholder: int, wrappers: list[tuple[int, int] | None],
                  names: list[str]) -> Spans:
    """Spans `start placeholder* end`, the pair of kind k being wrappers[k] (None: the kind has none).
    A placeholder outside a span, a span not closed by its own end token and an end token with no
    start are errors naming the row and position of the first one."""
    B, S = input_ids.shape
    pos = torch.arange(S, device=input_ids.device).expand(B, S)
    held = input_ids == placeholder
    # for every position, the next token that is not a placeholder (S: none) and the last one before it (-1)
    nxt = torch.where(held, S, pos).flip(1).cummin(1).values.flip(1)
    nxt = torch.cat([nxt[:, 1:], torch.full_like(nxt[:, :1], S)], 1)
    prev = last_other(held)
    prev = torch.cat([torch.full_like(prev[:, :1], -1), prev[:, :-1]], 1)
    kind = torch.full_like(input_ids, -1)  # the kind a token opens, -1 if none
    end = torch.full_like(input_ids, -1)  # the token that must close it
    for k, pair in enumerate(wrappers):
        if pair is not None:
            kind = torch.where(input_ids == pair[0], k, kind)
            end = torch.where(input_ids == pair[0], pair[1], end)
    opened = (prev >= 0) & (kind.gather(1, prev.clamp(min=0)) >= 0)  # the last non-placeholder before opens a span
    rows, starts = (kind >= 0).nonzero(as_tuple=True)
    closes = nxt[rows, starts]
    padded = torch.cat([input_ids, torch.full_like(input_ids[:, :1], -1)], 1)  # -1: the end of the input
    errors: list[tuple[int, int, str]] = []
    bad = padded[rows, closes] != end[rows, starts]
    for r, i, j in zip(rows[bad].tolist(), starts[bad].tolist(), closes[bad].tolist()):
        found = "the end of the input" if j == S else f"token {int(input_ids[r, j])}"
        errors.append((r, i, f"row {r}: the {names[int(kind[r, i])]} span opened at position {i} must be "
                             f"placeholders closed by {int(end[r, i])}, but {found} follows at position {j}"))
    for r, i in (held & ~opened).nonzero().tolist():
        errors.append((r, i, f"row {r}: media placeholder at position {i} is outside any media span"))
    for k, pair in enumerate(wrappers):
        if pair is not None:
            for r, i in ((input_ids == pair[1]) & ~opened).nonzero().tolist():
                errors.append((r, i, f"row {r}: {names[k]} span end token at position {i} has no start"))
    if errors:
        raise InputError(min(errors)[2])
    return Spans(rows, starts + 1, closes - starts - 1, kind[rows, starts])


def check_total(spans: Spans, n_media_tokens: int, found: str, given: str) -> None:
    """The spans' placeholders must number the media's tokens: "input_ids hold <n> <found> but <given>"."""
    n = int(spans.lengths.sum())
    if n != n_media_tokens:
        raise InputError(f"input_ids hold {n} {found} but {given}")


def check_spans(spans: Spans, sizes: list[int], kind: str, name: str, plural: str) -> None:
    """One span per media, in order, each as long as its media's embeddings (sizes)."""
    if len(spans) != len(sizes):
        raise InputError(f"input_ids hold {len(spans)} {kind} spans but {name} holds {len(sizes)} {plural}")
    wrong = (spans.lengths != torch.tensor(sizes, dtype=torch.long, device=spans.lengths.device)).nonzero()
    if len(wrong):
        n = int(wrong[0, 0])
        raise InputError(f"{kind} span {n} (row {int(spans.rows[n])}, position {int(spans.starts[n])}) holds "
                         f"{int(spans.lengths[n])} placeholder tokens but its {kind} gives {sizes[n]} embeddings")


def scatter(x: torch.Tensor, spans: Spans, media: torch.Tensor) -> torch.Tensor:
    """x (B, S, ...) with its spanned tokens replaced by media (T, ...), span after span."""
    return x.index_put(spans.index(), media.to(x.dtype))
