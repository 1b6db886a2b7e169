"""Events from the batcher's thread to the server's event loop, with one wake-up of the loop per batch of them.

asyncio's `call_soon_threadsafe` writes a byte to the loop's self-pipe on every call; called per token per
request it costs the batcher's thread a system call each time and wakes the loop as often. A `Relay` queues the
events of every request and asks the loop once to deliver all that came while it was busy.
"""

from __future__ import annotations

import asyncio
import threading


class Relay:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, object]] = []  # not yet delivered; non-empty: a delivery is asked

    def put(self, queue: asyncio.Queue, item: object) -> None:
        """`queue.put_nowait(item)` in the loop's thread, soon; safe from any thread."""
        with self.lock:
            self.pending.append((queue, item))
            if len(self.pending) > 1:
                return  # the delivery asked for the first one takes this one too
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is left to deliver to, and the next put must not wait
            with self.lock:
                self.pending.clear()

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, item in pending:
            queue.put_nowait(item)
