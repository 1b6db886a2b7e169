"""The relay from the batcher's thread to the event loop: every event arrives, in order per queue, and the events
that come while the loop is busy are delivered with one wake-up."""

import asyncio
import threading

from polymodal.serve.relay import Relay


class Counted(Relay):
    deliveries = 0

    def _deliver(self) -> None:
        self.deliveries += 1
        super()._deliver()


def test_events_from_another_thread_arrive_in_order_with_one_wake_up_per_burst():
    loop = asyncio.new_event_loop()
    try:
        relay = Counted(loop)
        queues = [asyncio.Queue(), asyncio.Queue()]

        def burst(start: int) -> None:  # the loop is not running: everything waits for one delivery
            for i in range(start, start + 50):
                relay.put(queues[i % 2], i)

        thread = threading.Thread(target=burst, args=(0,))
        thread.start()
        thread.join()

        async def drain(n: int) -> list[list[int]]:
            return [[await q.get() for _ in range(n)] for q in queues]

        assert loop.run_until_complete(drain(25)) == [list(range(0, 50, 2)), list(range(1, 50, 2))]
        assert relay.deliveries == 1 and not relay.pending
        thread = threading.Thread(target=burst, args=(50,))  # the next burst asks for a delivery of its own
        thread.start()
        thread.join()
        assert loop.run_until_complete(drain(25)) == [list(range(50, 100, 2)), list(range(51, 100, 2))]
        assert relay.deliveries == 2
    finally:
        loop.close()


def test_a_relay_into_a_closed_loop_drops_its_events_instead_of_holding_every_later_one():
    loop = asyncio.new_event_loop()
    relay, queue = Relay(loop), asyncio.Queue()
    loop.close()
    relay.put(queue, 1)
    relay.put(queue, 2)
    assert not relay.pending and queue.empty()
