"""The one early-fusion core: media embeddings (or media tokens) take the place of placeholder spans in
the input of one decoder. PaliGemma, KOSMOS-1, Chameleon and Gemini (Fuyu) are built on it; Flamingo,
which fuses by cross-attention instead, shares its prefill/decode split.

A family says where its spans are and encodes its media; this module, once for all of them:
  - finds the spans, vectorised (`runs`, `wrapped_spans`): row-major order, the order media are given in
  - checks them against the media before any compute (`check_total`, `check_spans`): the error names the
    placeholders found and the media given
  - scatters the media in (`scatter`), out of place so autograd sees it
  - builds the segments (prefix blocks, documents, padding, positions) and runs the decoder (`prefill`)
  - splits prefill from decode (`decoding`): media are encoded once; a decode step takes tokens only

Shapes: B batch, S tokens, N spans, T spanned tokens in all, D decoder width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polymodal.errors import InputError, check_ids, check_mask, check_tensors
from polymodal.nn.cache import Cache
from polymodal.nn.masks import make_segments
from polymodal.nn.transformer import Decoder, ModelOutput


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
    prev = torch.where(held, -1, pos).cummax(1).values
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


def decoding(cache: Cache | None, **prefill_only: torch.Tensor | None) -> bool:
    """True when the cache already holds tokens: a decode step, which takes none of the prefill-only inputs."""
    check_tensors(**prefill_only)
    if cache is None or cache.length == 0:
        return False
    given = [k for k, v in prefill_only.items() if v is not None]
    if given:
        raise InputError(f"{given} belong to the first (prefill) call, not to decode steps: media are encoded once")
    return True


def check_inputs(decoder: Decoder, input_ids: torch.Tensor, *, within_context: bool = True,
                 **same_shape: torch.Tensor | None) -> None:
    """input_ids (B, S) of known tokens, at most the context long (unless the family checks that itself),
    and every per-token input given with its shape (an attention_mask of 0s and 1s)."""
    check_ids(input_ids)
    for name, t in same_shape.items():
        if name == "attention_mask" and t is not None:
            check_mask(t, input_ids.shape)
        check_tensors(**{name: t})
        if t is not None and t.shape != input_ids.shape:
            raise InputError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}")
    if within_context:
        check_length(decoder, input_ids)
    decoder.check_token_ids(input_ids)


def check_length(decoder: Decoder, input_ids: torch.Tensor) -> None:
    if input_ids.shape[1] > decoder.config.max_seq_len:
        raise InputError(f"sequence of {input_ids.shape[1]} tokens exceeds max_seq_len={decoder.config.max_seq_len}")


def prefill(decoder: Decoder, embeds: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
            document_ids: torch.Tensor | None = None, block_ids: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, first_position: int = 0, labels: torch.Tensor | None = None,
            cache: Cache | None = None, logits_to_keep: int = 0) -> ModelOutput:
    """The decoder over fused embeddings (B, S, D) (unscaled; the decoder applies its embedding scale):
    segments from the padding, packed documents and bidirectional blocks (see `masks.make_segments`),
    positions counted from first_position unless given."""
    B, S, _ = embeds.shape
    seg = make_segments(B, S, embeds.device, attention_mask=attention_mask, document_ids=document_ids,
                        block_ids=block_ids, position_ids=position_ids)
    if first_position:
        seg.positions = seg.positions + first_position
    plain = all(t is None for t in (attention_mask, document_ids, block_ids))
    h = decoder.hidden_states(embeds, seg, cache=cache, plain_causal=plain)
    return decoder.head(h, labels, logits_to_keep)
