"""The block allocator of a paged KV cache (vLLM's `BlockPool`): host-side bookkeeping only, no tensors.

Blocks 1..n-1 hold tokens; block 0 is the null block, where padding writes and which no block table
lists. A block is reference counted: a sequence holds it, and so does every sequence that shares it
through the prefix cache. A full block registered under a prefix key (`prefix_keys`: the hash of the tokens
it depends on, which may run past its end, to `end`) outlives its last user: it stays cached, idle, until a lookup takes it again or the pool runs short and evicts the least
recently used idle block.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque

from polymodal.errors import InputError

NULL_BLOCK = 0


class CacheFull(InputError):
    """The pool has fewer free (or evictable) blocks than a write needs."""


class BlockPool:
    def __init__(self, n_blocks: int):
        if n_blocks < 2:
            raise InputError(f"a block pool needs at least 2 blocks (one is the null block), got {n_blocks}")
        self.n_blocks = n_blocks
        self.free: deque[int] = deque(range(1, n_blocks))
        self.refs = [0] * n_blocks
        self.cached: dict[bytes, int] = {}  # prefix key -> block
        self.key_of: dict[int, tuple[bytes, bytes, int]] = {}  # block -> its key, base and end
        self.ends: dict[bytes, Counter[int]] = {}  # base -> the ends of the blocks cached under it
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence holds, least recent first

    @property
    def available(self) -> int:
        """Blocks an allocation may take: the free ones and the idle cached ones it would evict."""
        return len(self.free) + len(self.idle)

    @property
    def in_use(self) -> int:
        return sum(r > 0 for r in self.refs)

    def check_room(self, n: int) -> None:
        if n > self.available:
            raise CacheFull(f"the paged KV cache has {self.available} free blocks of {self.n_blocks - 1}; "
                            f"this write needs {n}")

    def allocate(self) -> int:
        self.check_room(1)
        if self.free:
            block = self.free.popleft()
        else:  # evict the least recently used idle cached block
            block, _ = self.idle.popitem(last=False)
            key, base, end = self.key_of.pop(block)
            del self.cached[key]
            self.ends[base][end] -= 1
            if not +self.ends[base]:
                del self.ends[base]
        self.refs[block] = 1
        return block

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.key_of:
                self.idle[block] = None
            else:
                self.free.append(block)

    def register(self, block: int, key: bytes, base: bytes, end: int) -> None:
        """Caches a full, written block under its prefix key (the hash of the tokens up to `end`, filed under
        `base`, the hash up to the block's own end); a key already cached keeps its first block."""
        if key not in self.cached and block not in self.key_of:
            self.cached[key] = block
            self.key_of[block] = (key, base, end)
            self.ends.setdefault(base, Counter())[end] += 1

    def ends_of(self, base: bytes) -> list[int]:
        """Where the tokens that cached blocks filed under base depend on end."""
        return list(self.ends.get(base, ()))

    def take(self, key: bytes) -> int | None:
        """The block cached under key, now held once more (revived if idle), or None."""
        block = self.cached.get(key)
        if block is None:
            return None
        if self.refs[block] == 0:
            del self.idle[block]
        self.refs[block] += 1
        return block
