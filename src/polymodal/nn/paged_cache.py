"""Paged KV cache (Kwon et al. 2023, vLLM's PagedAttention) with prefix caching.

A `PagedCache` holds, per layer, one pool of fixed-size blocks of K/V slots, the `Segments` of every slot,
and a block table per sequence: a sequence takes a block when its last one is full and gives them all
back when it finishes, so memory follows the tokens in use rather than slots x context. `batch(ids)` is
what a model is given as its `cache`: it follows the `nn.cache.Cache` protocol that `Decoder` reads
(`length`, `write(seg)` -> input_pos, `slots`, `layers[i].update(input_pos, k, v)`, `next_segments(n)`),
so prefill and decode run unchanged through the one `Attention`. Rows of a batch hold sequences of any
lengths; padding is never stored (it writes to the null block, slot 0) and each row continues from its
own last token.

Reading here gathers each row's K/V through its block table into a (B, nkv, L, hs) tensor, L the longest
row, and lets the usual kernel attend with the segments' mask. The table of slots is built as tensors once per
call; a decode step over the rows of the last call only appends its new slots to that call's table, takes its
tokens' segments from that call's last ones and, packed, appends a column to that call's mask (`LastCall`): the
host work of a decode step stays a few tensor ops whatever the rows' lengths. A GPU kernel (vLLM's paged attention,
FlexAttention's paged block mask) reads the blocks in place through the table instead, so no copy of
the keys is made; the bookkeeping and the slot layout here are what it reads.

A cross-attention model (Flamingo) also keeps, per sequence, the K/V of its media in every cross-attention
layer, the media its next tokens attend to and the media layout (N media of L tokens), which its `make_cache`
cache holds as `cross_kv(j)`, `media_ids` and `media_layout`: a prefill stores each row's, a decode call
reads them stacked, each row's K/V padded to the most media of the batch (padding no token's media id
reaches, so no token attends to it). They are never shared: such a prompt with media has no prefix keys.

Prefix caching: `add(seq, prompt)` starts a sequence on the cached blocks of the longest prefix of the
prompt that `prefix_keys` finds (its keys cover token ids, every per-token input and each media item's
content hash), reference counted, and files the prompt's full blocks for later requests once the calls
that wrote them have returned (at the next `add` or `awaited`, or at `free` unless a call failed). `awaited(prompt)`
tells how much of a waiting prompt is cached now and which prompts being written would give it a longer prefix,
for a cache-aware admission.
A hit covers every media span and ends where a new group starts (see `prefix_keys`), so the rest of
the prompt continues causally through the model's `decode`.

Shapes: B rows, S new tokens, L the longest row, nkv key-value heads, hs head size, N slots in the pool.
"""

from __future__ import annotations

import functools

import torch

from polymodal.errors import InputError
from polymodal.nn.block_pool import NULL_BLOCK, BlockPool
from polymodal.nn.cache import Cache, CrossKV
from polymodal.nn.masks import Segments, attention_mask
from polymodal.nn.packed import PackedGroup, PackedMask, gather_rows
from polymodal.nn.prefix_keys import PromptKeys, group_ends

SEGMENT_FIELDS = ("positions", "groups", "docs", "valid")
CROSS_FIELDS = {"media_ids", "media_layout"}  # what a cross-attention model's cache adds, and a paged batch holds


def kv_bytes(tokens: int, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes a cache spends on `tokens` slots: K and V in every layer, and the slot's segments (three longs
    and a bool), as both `nn.cache.Cache` and `PagedCache` lay them out."""
    per_slot = 2 * n_layers * n_kv_heads * head_dim * dtype.itemsize + 3 * 8 + 1
    return tokens * per_slot


class PagedLayer:
    """One layer's view of a batch (or a step): writes new K/V into the pool, reads each row's through its table."""

    def __init__(self, batch: PagedBatch | PagedStep, layer: int):
        self.batch, self.layer = batch, layer

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos (B, S) pool slots; k, v (B, nkv, S, hs) -> each row's K/V (B, nkv, L, hs)
        # (a packed step: the pools (N, nkv, hs), which its mask reads per group)
        cache, index, at = self.batch.cache, self.batch.slot_index, input_pos.reshape(-1)
        out = []
        for pool, new in ((cache.k[self.layer], k), (cache.v[self.layer], v)):
            new = new.transpose(1, 2).flatten(0, 1)
            pool.index_copy_(0, at, new if new.dtype == pool.dtype else new.to(pool.dtype))
            out.append(pool if index is None else gather_rows(pool, index))
        return out


class PagedBatch:
    """Sequences of a `PagedCache`, one per row, as the `cache` of one model call."""

    def __init__(self, cache: PagedCache, seq_ids: list[int], new_tokens: list[int] | None = None):
        unknown = [s for s in seq_ids if s not in cache.tables]
        if unknown or not seq_ids or len(set(seq_ids)) != len(seq_ids):
            raise InputError(f"a paged batch takes distinct sequences the cache holds; unknown {unknown}, "
                             f"given {seq_ids}")
        started = {cache.lengths[s] > 0 for s in seq_ids}
        if len(started) > 1 and new_tokens is None:  # a step (new_tokens given) starts new ones causally
            raise InputError("a paged batch either prefills new sequences or continues sequences that hold tokens; "
                             f"lengths {[cache.lengths[s] for s in seq_ids]} mix both")
        if new_tokens is not None and (len(new_tokens) != len(seq_ids) or min(new_tokens) < 1):
            raise InputError(f"new_tokens gives a count >= 1 per sequence; got {new_tokens} for {len(seq_ids)} "
                             f"sequences")
        self.cache, self.seq_ids, self.new_tokens = cache, list(seq_ids), new_tokens
        self.batch = len(seq_ids)
        self.slot_index: torch.Tensor | None = None  # (B, L) pool slots of each row, null-padded
        self.slots: Segments | None = None  # their segments, in the frame of the last write's queries

    @functools.cached_property
    def layers(self) -> list[PagedLayer]:
        return [PagedLayer(self, i) for i in range(self.cache.n_layers)]

    @property
    def length(self) -> int:
        return max(self.cache.lengths[s] for s in self.seq_ids)

    def next_segments(self, n: int = 1) -> Segments:
        """Segments of n new causal tokens after each row's last one (a new row's from position 0 and group 1, as
        a prefill of its tokens writes them); with `new_tokens`, row b's tokens past its count are padding (a
        decode step beside chunks of prompts)."""
        if self.new_tokens is not None and max(self.new_tokens) > n:
            raise InputError(f"new_tokens {self.new_tokens} counts more than the {n} tokens given")
        cache = self.cache
        tail = cache.last.tail if n == 1 and cache.last is not None and cache.last.follows(self.seq_ids) else None
        if tail is not None:  # one token after each row's last, all valid: no slot read
            return Segments(tail.positions + 1, tail.groups + 1, tail.docs, tail.valid)
        lengths = [cache.lengths[s] for s in self.seq_ids]
        # a new row reads the null slot's segments, then takes position -1, group 0 and document 0 instead
        last = torch.tensor([cache.slot(s, n - 1) if n else NULL_BLOCK * cache.block_size
                             for s, n in zip(self.seq_ids, lengths)], device=cache.device)
        step = torch.arange(1, n + 1, device=last.device)
        counts = torch.tensor(self.new_tokens or [n] * self.batch, device=last.device)
        stored = cache.segments
        positions, groups, docs = stored.positions[last], stored.groups[last], stored.docs[last]
        if 0 in lengths:
            new = torch.tensor([length == 0 for length in lengths], device=cache.device)
            positions, groups, docs = (torch.where(new, fill, t)
                                       for fill, t in ((-1, positions), (0, groups), (0, docs)))
        return Segments(positions=positions[:, None] + step, groups=groups[:, None] + step,
                        docs=docs[:, None].expand(-1, n).clone(), valid=step[None, :] <= counts[:, None])

    def cross_kv(self, layer: int) -> PagedCrossKV:
        return PagedCrossKV(self, layer)

    @property
    def media_ids(self) -> torch.Tensor | None:
        """(B, 1) the media each row's next tokens attend to (0: none); None when no row has media."""
        ids = [self.cache.media.get(s) for s in self.seq_ids]
        if all(i is None for i in ids):
            return None
        return torch.stack([i[0] if i is not None else torch.zeros(1, dtype=torch.long, device=self.cache.device)
                            for i in ids])

    @media_ids.setter
    def media_ids(self, ids: torch.Tensor | None) -> None:
        for row, seq in enumerate(self.seq_ids):
            if ids is None:
                self.cache.media.pop(seq, None)
            else:
                self.cache.media[seq] = (ids[row], (0, 0))

    @property
    def media_layout(self) -> tuple[int, int]:
        """(N, L): the most media of any row, of L tokens each ((0, 0) without media)."""
        layouts = [self.cache.media[s][1] for s in self.seq_ids if s in self.cache.media]
        return (max(n for n, _ in layouts), layouts[0][1]) if layouts else (0, 0)

    @media_layout.setter
    def media_layout(self, layout: tuple[int, int]) -> None:
        for seq in self.seq_ids:
            if seq in self.cache.media:
                self.cache.media[seq] = (self.cache.media[seq][0], tuple(layout))

    def write(self, seg: Segments) -> torch.Tensor:
        """Takes slots for each row's valid new tokens (blocks as needed) and records their segments;
        returns the pool slots (B, S) the layers write K/V to (padding: the null slot). The rows' slot table and
        its segments are built once per call, as tensors, whatever the rows' lengths; a decode step of one token
        per row over the rows of the last call extends that call's table by a column (`PagedCache.last`)."""
        cache = self.cache
        if seg.valid.shape[1] == 1 and cache.last is not None and cache.last.follows(self.seq_ids):
            return self._extend(seg)
        if seg.valid.shape[1] == 1 and all(cache.lengths[s] for s in self.seq_ids):
            return self._write_one(seg)
        valid = seg.valid.cpu()
        counts = valid.sum(1)
        starts = torch.tensor([cache.lengths[s] for s in self.seq_ids])
        cache.reserve(self.seq_ids, counts.tolist())
        for seq, end in zip(self.seq_ids, (starts + counts).tolist()):
            cache.lengths[seq] = end
        table = cache.slot_table(self.seq_ids, device="cpu")
        # the k-th valid token of a row goes to the row's slot start + k
        order = (valid.long().cumsum(1) - 1 + starts[:, None]).clamp(0, table.shape[1] - 1)
        input_pos = torch.where(valid, table.gather(1, order), NULL_BLOCK * cache.block_size)
        # a new sequence's groups are kept from 1 on, whatever padding came before it
        first = seg.groups.cpu().gather(1, valid.long().argmax(1, keepdim=True))[:, 0]
        shift = torch.where((starts == 0) & (counts > 0), 1 - first, 0)
        input_pos, shift = input_pos.to(cache.device), shift.to(cache.device)
        cache.store(input_pos, seg, shift)
        self.slot_index = table.to(cache.device)
        self.slots = cache.gather_segments(self.slot_index, shift)
        # a shifted frame is this call's alone; a last column valid in every row holds each row's last token
        tail = Segments(*(getattr(seg, name)[:, -1:].clone() for name in SEGMENT_FIELDS)) \
            if bool(valid[:, -1].all()) else None
        cache.last = None if bool(shift.any()) else LastCall(self, tail)
        return input_pos

    def _take_one(self, seg: Segments) -> torch.Tensor:
        """A slot for one new token after each row's last (every row holds tokens), its segments stored: (B, 1)."""
        cache = self.cache
        cache.reserve(self.seq_ids, [1] * self.batch)
        slots = [cache.slot(seq, cache.lengths[seq]) for seq in self.seq_ids]
        for seq in self.seq_ids:
            cache.lengths[seq] += 1
        input_pos = torch.tensor(slots, dtype=torch.long, device=cache.device)[:, None]
        cache.store(input_pos, seg)
        return input_pos

    def _write_one(self, seg: Segments) -> torch.Tensor:
        """One new token after each row's last, rows of another call than the last: the table built anew, as `write`
        builds it, without the bookkeeping of padding, new rows and counts."""
        input_pos = self._take_one(seg)
        self.slot_index = self.cache.slot_table(self.seq_ids)
        self.slots = self.cache.gather_segments(self.slot_index)
        self.cache.last = LastCall(self, seg)
        return input_pos

    def _extend(self, seg: Segments) -> torch.Tensor:
        """One new token per row, after the last call's: its slot appended to that call's table as a column (a
        shorter row's null slots stay between, which its mask never reads)."""
        cache, last = self.cache, self.cache.last
        input_pos = self._take_one(seg)
        self.slot_index = torch.cat([last.slot_index, input_pos], 1)
        self.slots = Segments(*(torch.cat([getattr(last.slots, name), getattr(seg, name)], 1)
                                for name in SEGMENT_FIELDS))
        cache.last = LastCall(self, seg)
        return input_pos


class LastCall:
    """The rows, lengths and slot table (with its segments) of a paged cache's last call, which a decode step
    over the same rows, none written since, extends; `tail`, the segments of each row's last token (B, 1), when
    known, which the step's follow; `mask`, the attention mask of a packed call's one-token rows (B, 1, 1, L) (their
    queries' each the row's last token), which the step's extends."""

    def __init__(self, batch: PagedBatch, tail: Segments | None = None):
        self.cache, self.seq_ids = batch.cache, list(batch.seq_ids)
        self.lengths = [batch.cache.lengths[s] for s in batch.seq_ids]
        self.slot_index, self.slots, self.tail = batch.slot_index, batch.slots, tail
        self.mask: torch.Tensor | None = None

    def follows(self, seq_ids: list[int]) -> bool:
        return seq_ids == self.seq_ids and [self.cache.lengths[s] for s in seq_ids] == self.lengths


class PagedCrossKV:
    """One cross-attention layer's media K/V for a batch (`nn.cache.CrossKV`'s protocol): `set` at prefill keeps
    each row's, `k` / `v` are the rows' stacked (B, nkv, N*L, hs), zero-padded past a row's media."""

    def __init__(self, batch: PagedBatch, layer: int):
        self.batch, self.layer = batch, layer

    def set(self, k: torch.Tensor, v: torch.Tensor):
        for row, seq in enumerate(self.batch.seq_ids):
            self.batch.cache.cross.setdefault(seq, {})[self.layer] = (k[row], v[row])
        return k, v

    def _stacked(self, which: int) -> torch.Tensor | None:
        held = [self.batch.cache.cross.get(s, {}).get(self.layer) for s in self.batch.seq_ids]
        known = [h[which] for h in held if h is not None]
        if not known:
            return None
        L = max(t.shape[1] for t in known)
        out = known[0].new_zeros(len(held), known[0].shape[0], L, known[0].shape[2])
        for row, h in enumerate(held):
            if h is not None:
                out[row, :, :h[which].shape[1]] = h[which]
        return out

    @property
    def k(self) -> torch.Tensor | None:
        return self._stacked(0)

    @property
    def v(self) -> torch.Tensor | None:
        return self._stacked(1)


class PagedStep:
    """A decode call's view of a `PagedBatch` with its host work done ahead (blocks taken, slots and segments
    written, each row's media state stacked), so the model reads tensors only and the call compiles once for any
    rows and lengths (`torch.compile(dynamic=True)`); eager calls run the same code."""

    def __init__(self, batch: PagedBatch, n: int):
        if batch.length == 0:
            raise InputError("a paged step continues sequences that hold tokens; prefill new ones through batch()")
        self.cache, self.batch, self.length = batch.cache, batch.batch, batch.length
        self.segments = batch.next_segments(n)
        self.input_pos = batch.write(self.segments)
        self.slot_index, self.slots = batch.slot_index, batch.slots
        self.layers = [PagedLayer(self, i) for i in range(batch.cache.n_layers)]
        self.media_ids, self.media_layout = batch.media_ids, batch.media_layout
        held = {layer for seq in batch.seq_ids for layer in batch.cache.cross.get(seq, {})}
        self.cross = {layer: CrossKV() for layer in held}
        for layer, kv in self.cross.items():
            kv.set(batch.cross_kv(layer).k, batch.cross_kv(layer).v)

    def next_segments(self, n: int = 1) -> Segments:
        return self.segments

    def write(self, seg: Segments) -> torch.Tensor:
        return self.input_pos

    def cross_kv(self, layer: int) -> CrossKV:
        return self.cross.setdefault(layer, CrossKV())  # empty when no row has media, as `Cache.cross_kv`'s


class PackedStep:
    """The cache of a packed call (`nn.packed`): sequences feeding counts[b] tokens each (a decode row 1, a prompt
    chunk more, a new sequence its prompt's first), concatenated in that order into one row of T tokens. Its host
    work is done ahead, as a `PagedStep`'s: the rows of one token and the others are two `PagedBatch`es, each
    writing its rows' slots and segments as a decode call does (a new row's as its prefill would), and the
    `PackedMask` (`slots`) attends per group. The layers write K/V at `input_pos` (1, T) and hand the mask the
    pools. The rows of one token keep extending the last call's table step after step (`LastCall`)."""

    def __init__(self, cache: PagedCache, seq_ids: list[int], counts: list[int]):
        self.cache, self.batch, self.slot_index = cache, 1, None
        starts = [sum(counts[:b]) for b in range(len(counts))]
        groups, kept, packed_of = [], [], []  # packed_of: the packed token of each kept output, in group order
        held = None
        for rows in ([b for b, n in enumerate(counts) if n == 1], [b for b, n in enumerate(counts) if n > 1]):
            if not rows:
                continue
            n = [counts[b] for b in rows]
            S = max(n)
            batch = PagedBatch(cache, [seq_ids[b] for b in rows], n)
            last = cache.last if S == 1 and cache.last is not None and cache.last.follows(batch.seq_ids) else None
            seg = batch.next_segments(S)
            input_pos = batch.write(seg)
            if last is not None and last.mask is not None:
                # each row's query after the last call's (its row's latest token, of the row's highest group): it
                # sees what that one saw and its own new key, appended as the table's last column (made as
                # `attention_mask` makes it, a view: a compiled step guards on that)
                mask = torch.cat([last.mask[:, 0], last.mask.new_ones(len(rows), 1, 1)], -1).unsqueeze(1)
            else:
                mask = attention_mask(seg, batch.slots)
            if S == 1:
                held = cache.last
                if held is not None:
                    held.mask = mask
            # query s of row b is packed token starts[b] + s; a pad repeats its row's last token
            q_index = None if rows == list(range(len(rows))) and S == 1 else torch.tensor(
                [[starts[b] + min(s, counts[b] - 1) for s in range(S)] for b in rows], device=cache.device)
            keep = None if min(n) == S else torch.tensor([i * S + s for i, k in enumerate(n) for s in range(k)],
                                                         device=cache.device)
            groups.append(PackedGroup(q_index, batch.slot_index, mask, keep))
            kept.append([t if keep is None else t.reshape(-1).index_select(0, keep)
                         for t in (input_pos, *(getattr(seg, name) for name in SEGMENT_FIELDS))])
            packed_of += [starts[b] + s for b in rows for s in range(counts[b])]
        if held is not None:  # the one-token rows' table, which the next step's decode rows extend
            cache.last = held
        order = None
        if packed_of != list(range(len(packed_of))):
            order = torch.empty(len(packed_of), dtype=torch.long)
            order[packed_of] = torch.arange(len(packed_of))
            order = order.to(cache.device)
        if len(kept) == 1:  # one group, its rows in packed order
            fields = [t.reshape(1, -1) for t in kept[0]]
        else:
            fields = [torch.cat([t.reshape(-1) for t in field]) for field in zip(*kept)]
            fields = [t[None] if order is None else t.index_select(0, order)[None] for t in fields]
        self.input_pos, self.segments = fields[0], Segments(*fields[1:])
        self.slots = PackedMask(groups, order)
        self.layers = [PagedLayer(self, i) for i in range(cache.n_layers)]
        self.length = max(cache.lengths[s] for s in seq_ids)  # > 0: the model continues every row from its segments

    def next_segments(self, n: int = 1) -> Segments:
        return self.segments

    def write(self, seg: Segments) -> torch.Tensor:
        return self.input_pos


class PagedCache:
    """Block pools for every layer of one model, and the sequences that hold their blocks."""

    def __init__(self, n_blocks: int, block_size: int, n_layers: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, max_seq_len: int):
        if block_size < 1:
            raise InputError(f"a paged cache needs block_size >= 1, got {block_size}")
        self.pool = BlockPool(n_blocks)
        self.block_size, self.n_layers, self.max_seq_len = block_size, n_layers, max_seq_len
        self.shape = (n_layers, n_kv_heads, head_dim, dtype)
        self.device = torch.device(device)
        N = n_blocks * block_size
        self.k = [torch.zeros(N, n_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(N, n_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        long = dict(dtype=torch.long, device=device)
        self.segments = Segments(torch.zeros(N, **long), torch.zeros(N, **long), torch.zeros(N, **long),
                                 torch.zeros(N, dtype=torch.bool, device=device))
        self.tables: dict[int, list[int]] = {}  # sequence -> its blocks, in order
        self.lengths: dict[int, int] = {}  # sequence -> tokens written (or taken from the prefix cache)
        self.prompts: dict[int, PromptKeys] = {}  # sequence -> its prompt's keys, until its blocks are registered
        self.cross: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # sequence -> layer -> media K/V
        self.media: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}  # sequence -> (its media id (1,), layout)
        self.prompt_tokens = self.hit_tokens = 0  # prompt tokens looked up in the prefix cache, and found
        self.last: LastCall | None = None  # the last call's rows and slot table, for the next decode step

    @classmethod
    def for_model(cls, model, n_blocks: int, block_size: int = 16, *, dtype: torch.dtype | None = None) -> PagedCache:
        """A cache for a `LanguageModel`, in its parameters' dtype and device unless told."""
        own = type(model.make_cache(1, 1))
        added = {k for c in own.__mro__[:own.__mro__.index(Cache)] for k in vars(c) if not k.startswith("__")} \
            if issubclass(own, Cache) else {"its own state"}
        if added - CROSS_FIELDS:
            raise InputError(f"{type(model).__name__} keeps {sorted(added - CROSS_FIELDS)} in its cache "
                             f"({own.__name__}); the paged cache holds self- and cross-attention K/V only")
        cfg, weight = model.text_config, next(model.parameters())
        return cls(n_blocks, block_size, cfg.n_layers, cfg.kv_heads, cfg.head_size, dtype or weight.dtype,
                   weight.device, cfg.max_seq_len)

    # sequences and their blocks

    def add(self, seq: int, prompt: PromptKeys | None = None) -> int:
        """Starts sequence `seq`; given its prompt's keys, on the cached blocks of the longest prefix found.
        Returns the prompt tokens it starts with (0 without a hit): the caller runs the rest."""
        if seq in self.tables:
            raise InputError(f"sequence {seq} is already in the paged cache")
        self._file_written()
        blocks = self._lookup(prompt) if prompt is not None else []
        self.tables[seq], self.lengths[seq] = blocks, len(blocks) * self.block_size
        if prompt is not None:
            self.prompts[seq] = prompt
            self.prompt_tokens += prompt.length
            self.hit_tokens += self.lengths[seq]
        return self.lengths[seq]

    def free(self, seq: int, *, failed: bool = False) -> None:
        """A finished sequence gives its blocks back; its prompt's full blocks stay cached, idle, for the next
        hit, unless a model call on it failed (`failed`: its K/V may be half written)."""
        if seq not in self.tables:
            raise InputError(f"sequence {seq} is not in the paged cache")
        if not failed:
            self._register_prompt(seq)
        if self.last is not None and seq in self.last.seq_ids:
            self.last = None
        for block in self.tables.pop(seq):
            self.pool.release(block)
        del self.lengths[seq]
        for held in (self.prompts, self.cross, self.media):
            held.pop(seq, None)

    def batch(self, seq_ids: list[int], new_tokens: list[int] | None = None) -> PagedBatch:
        return PagedBatch(self, seq_ids, new_tokens)

    def step(self, seq_ids: list[int], n: int, new_tokens: list[int] | None = None) -> PagedStep:
        """The cache of one decode call of n tokens per row over sequences that hold tokens, its host work done."""
        return PagedStep(self.batch(seq_ids, new_tokens), n)

    def packed(self, seq_ids: list[int], counts: list[int]) -> PackedStep:
        """The cache of one packed call: counts[b] new tokens of each sequence (new ones among them), concatenated."""
        return PackedStep(self, seq_ids, counts)

    def slot(self, seq: int, i: int) -> int:
        return self.tables[seq][i // self.block_size] * self.block_size + i % self.block_size

    def reserve(self, seq_ids: list[int], counts: list[int]) -> None:
        """Allocates the blocks for counts[b] more tokens of each sequence, all or none."""
        long = [(s, self.lengths[s] + n) for s, n in zip(seq_ids, counts) if self.lengths[s] + n > self.max_seq_len]
        if long:
            raise InputError(f"sequence {long[0][0]} would hold {long[0][1]} tokens, past max_seq_len={self.max_seq_len}")
        need = [-(-(self.lengths[s] + n) // self.block_size) - len(self.tables[s]) for s, n in zip(seq_ids, counts)]
        self.pool.check_room(sum(need))
        for s, n in zip(seq_ids, need):
            self.tables[s] += [self.pool.allocate() for _ in range(n)]

    def slot_table(self, seq_ids: list[int], device: torch.device | str | None = None) -> torch.Tensor:
        """(B, L) each sequence's slots in order, padded with the null slot (on the cache's device unless told)."""
        lengths = torch.tensor([self.lengths[s] for s in seq_ids])
        L = int(lengths.max())
        n = -(-L // self.block_size)
        blocks = torch.tensor([(self.tables[s][:n] + [NULL_BLOCK] * n)[:n] for s in seq_ids], dtype=torch.long)
        slots = (blocks[:, :, None] * self.block_size + torch.arange(self.block_size)).flatten(1)[:, :L]
        table = torch.where(torch.arange(L) < lengths[:, None], slots, NULL_BLOCK * self.block_size)
        return table.to(self.device if device is None else device)

    # slot segments

    def store(self, input_pos: torch.Tensor, seg: Segments, shift: torch.Tensor | None = None) -> None:
        flat = input_pos.reshape(-1)  # padding writes the null slot, as not valid: no row reads it as a key
        for name in SEGMENT_FIELDS:
            value = getattr(seg, name) + shift[:, None] if name == "groups" and shift is not None else getattr(seg, name)
            getattr(self.segments, name).index_copy_(0, flat, value.reshape(-1))

    def gather_segments(self, slot_index: torch.Tensor, shift: torch.Tensor | None = None) -> Segments:
        """The segments of each row's slots (B, L), groups moved back into the frame of the queries just
        written (a new row's padding counted), so one `attention_mask` compares them."""
        seg = Segments(*(getattr(self.segments, name).take(slot_index) for name in SEGMENT_FIELDS))
        if shift is not None:
            seg.groups = seg.groups - shift[:, None]
        return seg

    # prefix cache

    def _lookup(self, prompt: PromptKeys) -> list[int]:
        """The cached blocks of the longest usable prefix, now held by the caller too."""
        return [self.pool.take(key) for key in self._found(prompt)]

    def _found(self, prompt: PromptKeys) -> list[bytes]:
        """The keys of the longest usable cached prefix: full blocks whose keys match, covering every media
        span, ending where a new group starts and before the prompt's last token (whose logits are needed)."""
        found, usable = [], 0
        for b in range((prompt.length - 1) // self.block_size):
            end_of_block = (b + 1) * self.block_size
            ends = [end for end in self.pool.ends_of(prompt.base(end_of_block)) if end <= prompt.length]
            key = next((k for k in (prompt.key(end_of_block, end) for end in ends) if k in self.pool.cached), None)
            if key is None:
                break
            found.append(key)
            if self.pool.key_of[self.pool.cached[key]][2] == end_of_block and end_of_block >= prompt.media_end:
                usable = len(found)
        return found[:usable]

    def awaited(self, prompt: PromptKeys) -> tuple[int, dict[int, int]]:
        """The prompt tokens `add` would start it on now (written prompts filed first), and the sequences whose
        prompts are being written (added, not yet filed) that, once filed, give `prompt` a longer usable prefix than
        that, each with the prompt tokens it would add (SGLang's cache-aware scheduling looks a waiting request up
        against the requests being prefilled beside it). A writer files each block under `PromptKeys.filed_key`
        where a hit may end: an equal key at a block end the lookup may stop at is the same prefix."""
        self._file_written()
        now, size = len(self._found(prompt)) * self.block_size, self.block_size
        if not self.prompts:
            return now, {}
        last = (prompt.length - 1) // size * size  # a hit leaves the prompt's last token
        wanted = {end: key for end in range(last, now, -size)
                  if end >= prompt.media_end and (key := prompt.filed_key(end)) is not None}
        if not wanted:
            return now, {}
        gains = {}
        for seq, theirs in self.prompts.items():
            end = next((end for end, key in wanted.items() if end <= theirs.length
                        and theirs.running[end] == prompt.running[end] and theirs.filed_key(end) == key), None)
            if end is not None:
                gains[seq] = end - now
        return now, gains

    def _file_written(self) -> None:
        """Files every prompt written whole in the prefix cache (`_register_prompt`): at a step boundary, after
        the calls that wrote them returned."""
        for seq in list(self.prompts):
            self._register_prompt(seq)

    def _register_prompt(self, seq: int) -> None:
        """Once a sequence's prompt is written, files its full blocks in the prefix cache. Done at the next `add`,
        or `awaited` (`_file_written`) or at `free`, after the model calls that wrote them returned."""
        prompt = self.prompts.get(seq)
        if prompt is None or self.lengths[seq] < prompt.length:
            return
        del self.prompts[seq]
        slots = [self.slot(seq, i) for i in range(prompt.length)]
        groups = self.segments.groups[torch.tensor(slots, device=self.device)].tolist()
        if any(b - a not in (0, 1) for a, b in zip(groups, groups[1:])):
            return  # padding inside the prompt left gaps in its groups: its blocks would not match a plain prompt's
        ends = group_ends(groups)
        for b in range(prompt.length // self.block_size):
            end_of_block = (b + 1) * self.block_size
            end = ends[end_of_block - 1]
            self.pool.register(self.tables[seq][b], prompt.key(end_of_block, end), prompt.base(end_of_block), end)

    # memory

    def bytes_held(self, seq_ids: list[int] | None = None) -> int:
        """Bytes of the blocks these sequences (all by default) hold, a shared block counted once."""
        if seq_ids is None:
            return kv_bytes(self.pool.in_use * self.block_size, *self.shape)
        blocks = {block for seq in seq_ids for block in self.tables[seq]}
        return kv_bytes(len(blocks) * self.block_size, *self.shape)

    @property
    def pool_bytes(self) -> int:
        """Bytes of the whole pool (its K/V and its slots' segments), allocated at the start."""
        return kv_bytes(self.pool.n_blocks * self.block_size, *self.shape)

    def static_bytes(self, slots: int, max_len: int) -> int:
        """Bytes the static `nn.cache.Cache` of `slots` rows of max_len tokens holds for the same model."""
        return kv_bytes(slots * max_len, *self.shape)
