"""The serving benchmark's raw-HTTP client (`benchmarks/stream_client.py`) reads a live `polymodal serve` as the
real `openai` client does: the same streamed text and usage for chats with and without an image and for
completions, its timestamps in order, a refused request raised with the server's answer."""

import gc
import sys
import time
from pathlib import Path

import pytest
from conftest import WORLD, image_message

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import stream_client  # noqa: E402

BODIES = [
    {"messages": image_message(WORLD.draw("red", "circle"), "what colour is the shape?"), "max_tokens": 9,
     "temperature": 0},
    {"messages": [{"role": "user", "content": "what is the shape?"}], "max_tokens": 7, "temperature": 0},
    {"prompt": "a red circle", "max_tokens": 6, "temperature": 0},
]


def openai_streamed(live, body: dict) -> tuple[str, int]:
    chat = "messages" in body
    create = live.client.chat.completions.create if chat else live.client.completions.create
    text, tokens = [], None
    for chunk in create(model="gemini-tiny", stream=True, stream_options={"include_usage": True}, **body):
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        text += [(c.delta.content if chat else c.text) or "" for c in chunk.choices]
    return "".join(text), tokens


@pytest.mark.parametrize("load", [("concurrency", 2), ("rate", 50.0)])
def test_the_benchmark_client_reads_what_the_openai_client_reads(live, load):
    records = stream_client.drive(live.url, "gemini-tiny", BODIES, load)
    for body, record in zip(BODIES, records):
        text, tokens = openai_streamed(live, body)
        assert (record.text, record.tokens) == (text, tokens) and text != ""
        assert record.sent < record.chunks[0] <= record.done
        assert record.chunks == sorted(record.chunks) and len(record.chunks) > 1


def test_a_refused_request_raises_with_the_servers_answer(live):
    with pytest.raises(RuntimeError, match="answered 400.*max_tokens"):
        stream_client.drive(live.url, "gemini-tiny", [{"prompt": "a red circle", "max_tokens": -3}],
                            ("concurrency", 1))


def test_the_client_collects_no_garbage_while_requests_run(live):
    """A collection in the benchmark's process (which holds torch and the reference's modules: about 200 ms for a
    full one) would stop the timestamps of every stream in flight, whichever server it fell on: the collector is
    off from the first request sent to the last answer read, and back on after."""
    started = []
    record_start = lambda phase, info: phase == "start" and started.append(time.perf_counter())  # noqa: E731
    gc.callbacks.append(record_start)
    try:
        records = stream_client.drive(live.url, "gemini-tiny", BODIES * 4, ("concurrency", 3))
    finally:
        gc.callbacks.remove(record_start)
    first, last = min(r.sent for r in records), max(r.done for r in records)
    assert started and not [t for t in started if first <= t <= last]
    assert gc.isenabled()
