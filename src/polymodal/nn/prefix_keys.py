"""Prefix-cache keys of a prompt's blocks (vLLM's automatic prefix caching, extended to media and to
bidirectional blocks).

A token's K/V depend on every token it may see at some layer: a causal token's on the tokens before it,
a token of a bidirectional group (PaliGemma's image + prompt prefix) on its whole group. So a block's
key hashes every token up to `end`, the end of the group of the block's last token, and then what decides
that the group ends there: the inputs of the token at `end` but its id (its token_type_id, its media), or
the end of the prompt. A causal token's group ends at the next token, whichever it is. Each token enters
the hash with all of its per-token inputs (input_ids, token_type_ids, ...) and, inside a media span,
its media's content hash (`media_cache.content_hash`) and its offset in it: the same text with another
image never shares a block. `base(n)` is the hash of the first n tokens alone, under which the block
pool files the ends its cached blocks reach. `ends`, where each token's group ends as the model will lay it
out (causal by default), says which blocks a prompt being written will file under a key a later prompt can
hit (`filed_key`), before its segments are written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from polymodal.errors import InputError

_START, _END = b"polymodal-prefix", b"\x00end-of-prompt"


def _h(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


class PromptKeys:
    def __init__(self, per_token: dict[str, torch.Tensor], media: Sequence[tuple[int, int, bytes]] = (),
                 media_end: int | None = None, ends: Sequence[int] | None = None):
        """per_token: each per-token input of one prompt, (P, ...) or (1, P, ...); media: (start, length,
        content hash) of each media span in it; media_end: the position after the last span's last token, its
        end token included (default: after its last media token, a span with no end token): a prompt cut
        there or later keeps every span whole; ends: for each token, the index after its group's last token
        (`group_ends`; default: causal, each token its own group)."""
        rows = {name: (t[0] if t.dim() > 1 and t.shape[0] == 1 else t).tolist() for name, t in per_token.items()}
        lengths = {name: len(r) for name, r in rows.items()}
        if not rows or len(set(lengths.values())) != 1:
            raise InputError(f"a prompt's per-token inputs must all be as long as its input_ids, got {lengths}")
        self.length = P = next(iter(lengths.values()))
        # what a token is but its id: the part of it that can decide where its group ends
        grouping = [repr([(name, rows[name][i]) for name in sorted(rows) if name != "input_ids"]).encode()
                    for i in range(P)]
        for start, length, digest in media:
            if start < 0 or length < 1 or start + length > P:
                raise InputError(f"a media span must lie within the prompt's {P} tokens, got start {start}, "
                                 f"length {length}")
            for offset in range(length):
                grouping[start + offset] += b"|media" + digest + offset.to_bytes(8, "little")
        self.grouping = grouping
        ids = rows.get("input_ids", [None] * P)
        contents = [repr(ids[i]).encode() + grouping[i] for i in range(P)]
        last = max((start + length for start, length, _ in media), default=0)
        if media_end is not None and not last <= media_end <= P:
            raise InputError(f"a prompt's media must end between its last media token and its {P} tokens, got "
                             f"media_end {media_end} after media tokens up to {last}")
        self.media_end = last if media_end is None else media_end
        self.ends = list(range(1, P + 1)) if ends is None else list(ends)
        if len(self.ends) != P:
            raise InputError(f"a prompt's group ends must give one end per token: {P} tokens, {len(self.ends)} ends")
        self.running = [_h(_START)]  # running[n]: the hash of the first n tokens
        for content in contents:
            self.running.append(_h(self.running[-1], content))

    def base(self, n: int) -> bytes:
        return self.running[n]

    def key(self, block_end: int, end: int) -> bytes:
        """The key of the block that ends before token `block_end` and whose tokens depend on the first `end`."""
        after = self.grouping[end] if end < self.length else _END
        return _h(self.running[end], after, block_end.to_bytes(8, "little"))

    def filed_key(self, block_end: int) -> bytes | None:
        """The key the block ending before `block_end` is filed under when a hit may end there (its last token's
        group ends with it), else None. It hashes every token before block_end and what decides the group ends
        there: two prompts with equal filed keys at block_end share that whole prefix."""
        return self.key(block_end, block_end) if self.ends[block_end - 1] == block_end else None


def group_ends(groups: list[int]) -> list[int]:
    """For each token of a sequence (its groups, nondecreasing), the index after the last token of its group."""
    ends, end = [0] * len(groups), len(groups)
    for i in range(len(groups) - 1, -1, -1):
        if i + 1 < len(groups) and groups[i + 1] != groups[i]:
            end = i + 1
        ends[i] = end
    return ends
