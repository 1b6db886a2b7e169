"""Media by content: a content hash of a media item, and a bounded cache of its encoder's output
(vLLM's multimodal encoder cache: the same image sent twice is encoded once).

The hash covers the item's dtype, shape and bytes, so two tensors that would encode alike hash alike and
any changed pixel, size or dtype hashes apart. The prefix cache keys its blocks with the same hash, so
the same text with another image never shares K/V.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch

from polymodal.errors import InputError


def content_hash(item: torch.Tensor) -> bytes:
    """sha256 of one media item's dtype, shape and values (read on the host)."""
    h = hashlib.sha256(f"{item.dtype}{tuple(item.shape)}".encode())
    h.update(item.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


class EncoderCache:
    """Outputs of one encoder by the content hash of their input item, least recently used evicted first once
    they hold more than `max_bytes`. Bound to one encoder: a cache read by two encoders would mix outputs."""

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise InputError(f"an encoder cache needs max_bytes >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def encode(self, items: torch.Tensor, encoder: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """items (N, ...) -> encoder outputs (N, ...), in order; the encoder runs once, on the items not cached
        (one batch of them), and each output is kept under its item's hash."""
        keys = [content_hash(item) for item in items]
        missing = list(dict.fromkeys(k for k in keys if k not in self.entries))
        self.misses += len(missing)  # items encoded
        self.hits += len(keys) - len(missing)  # items served without encoding
        fresh = {}
        if missing:
            first = {k: keys.index(k) for k in missing}
            outputs = encoder(items[[first[k] for k in missing]])
            fresh = dict(zip(missing, outputs))
        out = torch.stack([fresh[k] if k in fresh else self._touch(k) for k in keys])
        for k, output in fresh.items():
            self._keep(k, output.detach().clone())
        return out

    def _touch(self, key: bytes) -> torch.Tensor:
        self.entries.move_to_end(key)
        return self.entries[key]

    def _keep(self, key: bytes, output: torch.Tensor) -> None:
        size = output.numel() * output.element_size()
        if size > self.max_bytes:
            return  # an output larger than the whole cache is used once and not kept
        self.entries[key] = output
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
