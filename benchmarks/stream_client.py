"""The serving benchmark's client: streamed OpenAI completions over raw HTTP/1.1 on one asyncio event loop, each
server-sent event timestamped when its bytes arrive, as vLLM's `bench serve` client does (one aiohttp loop).

The `openai` client with a thread per request in flight spends about 0.3 ms of CPU per chunk building its
objects, and its threads share one GIL: at 64 in flight a chunk's timestamp waited behind the parsing of the
other streams' chunks, so latencies grew with the server's token rate. Here a chunk costs a read and a timestamp
while the stream runs; its JSON is read after the last byte. Each request has its own connection
(`Connection: close`), the same for every server.
"""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit

from serving_stats import Record, arrival_times, collector_paused


async def stream(url: str, model: str, body: dict) -> Record:
    """One streamed completion (`messages` in the body: chat): when each event with text came, the text, and the
    output tokens of the final usage chunk. A status other than 200 raises, with the server's answer."""
    chat = "messages" in body
    host = urlsplit(url)
    payload = json.dumps({"model": model, "stream": True, "stream_options": {"include_usage": True}, **body}).encode()
    head = (f"POST /v1/{'chat/completions' if chat else 'completions'} HTTP/1.1\r\nHost: {host.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
    sent = time.perf_counter()
    reader, writer = await asyncio.open_connection(host.hostname, host.port)
    try:
        writer.write(head.encode() + payload)
        status_line, *headers = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        chunked = "transfer-encoding: chunked" in (h.lower() for h in headers)
        events, pending = [], b""
        while data := await (_chunk(reader) if chunked else reader.read(1 << 16)):
            now = time.perf_counter()
            *complete, pending = (pending + data).split(b"\n\n")
            events += [(now, event) for event in complete]
    finally:
        writer.close()
    status = int(status_line.split()[1])
    if status != 200:
        raise RuntimeError(f"{url} answered {status}: {(pending + b''.join(e for _, e in events))[:500]!r}")
    chunks, text, tokens = [], [], 0
    for now, data in ((now, line[6:]) for now, event in events for line in event.decode().split("\n")
                      if line.startswith("data: ") and line != "data: [DONE]"):
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if piece:
                chunks.append(now)
                text.append(piece)
    return Record(sent=sent, done=time.perf_counter(), tokens=tokens, chunks=chunks, text="".join(text))


async def _chunk(reader: asyncio.StreamReader) -> bytes:
    """The next chunk of a chunked body, b"" at its end."""
    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
    data = await reader.readexactly(size + 2)  # the chunk and its CRLF
    return data[:-2]


def drive(url: str, model: str, bodies: list[dict], load: tuple[str, float], seed: int = 0) -> list[Record]:
    """The bodies' records in order: ("concurrency", c) keeps c in flight, each sent as soon as one before it is
    done; ("rate", r) sends each at its Poisson arrival time (seeded), whatever is in flight. No garbage is
    collected in this process while they run (`collector_paused`)."""
    kind, value = load

    async def closed_loop() -> list[Record]:
        records, queue = [None] * len(bodies), iter(enumerate(bodies))

        async def worker():
            for i, body in queue:
                records[i] = await stream(url, model, body)

        await asyncio.gather(*(worker() for _ in range(int(value))))
        return records

    async def open_loop() -> list[Record]:
        start = time.perf_counter()

        async def at(arrival: float, body: dict) -> Record:
            await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
            return await stream(url, model, body)

        return await asyncio.gather(*(at(t, body) for t, body in zip(arrival_times(len(bodies), value, seed), bodies)))

    with collector_paused():
        return asyncio.run(closed_loop() if kind == "concurrency" else open_loop())
