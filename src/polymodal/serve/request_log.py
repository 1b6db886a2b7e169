"""One log line per HTTP request the server answers (method, path, status, tokens, latency), and the same
requests counted for `/metrics` in Prometheus' text exposition format (version 0.0.4), with the time to each
completion's first token that the endpoint reports.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which wraps every response in a stream of its
own): it watches the status go out and writes the line when the last byte has gone, so a streamed answer is
timed to its end. The endpoint leaves its token counts in the request's state as `usage` (OpenAI's usage
dict); `/health` polls and `/metrics` scrapes are neither logged nor counted. Paths other than the server's
own are counted under path="other", so probes of made-up paths cannot grow the label set.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TextIO

QUIET = ("/health", "/metrics")
PATHS = ("/", "/v1/models", "/v1/examples", "/v1/chat/completions", "/v1/completions", "/v1/embeddings")
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)  # seconds


HISTOGRAMS = {"request_duration_seconds": "Time from a request's arrival to its last byte.",
              "time_to_first_token_seconds": "Time from a completion request's arrival to its first text or image."}


class Metrics:
    """Requests by path and status, tokens in and out, latency histograms (each request's duration by path, the
    time to a completion's first token), and the gauges `gauges()` reads at each scrape (queue depth, running
    requests, whether the worker lives)."""

    def __init__(self, gauges: Callable[[], dict[str, float]]):
        self.gauges = gauges
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (path, status) -> requests
        self.tokens: Counter = Counter()  # "prompt" / "completion" -> tokens
        self.counts: dict[tuple[str, str], list[int]] = {}  # (histogram, labels) -> per bucket, the last past all
        self.seconds: Counter = Counter()  # (histogram, labels) -> summed seconds

    def observe(self, path: str, status: int | str, seconds: float, usage: dict | None) -> None:
        path = path if path in PATHS else "other"
        with self.lock:
            self.requests[path, str(status)] += 1
            self._time("request_duration_seconds", f'path="{path}"', seconds)
            if usage:
                self.tokens["prompt"] += usage["prompt_tokens"]
                self.tokens["completion"] += usage["completion_tokens"]

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self._time("time_to_first_token_seconds", "", seconds)

    def _time(self, name: str, labels: str, seconds: float) -> None:
        counts = self.counts.setdefault((name, labels), [0] * (len(BUCKETS) + 1))
        counts[next((i for i, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))] += 1
        self.seconds[name, labels] += seconds

    def text(self) -> str:
        lines = ["# HELP polymodal_requests_total HTTP requests answered, by path and status.",
                 "# TYPE polymodal_requests_total counter"]
        with self.lock:
            lines += [f'polymodal_requests_total{{path="{p}",status="{s}"}} {n}'
                      for (p, s), n in sorted(self.requests.items())]
            for kind in ("prompt", "completion"):
                lines += [f"# HELP polymodal_{kind}_tokens_total {kind.title()} tokens of answered requests.",
                          f"# TYPE polymodal_{kind}_tokens_total counter",
                          f"polymodal_{kind}_tokens_total {self.tokens[kind]}"]
            for name, help in HISTOGRAMS.items():
                lines += [f"# HELP polymodal_{name} {help}", f"# TYPE polymodal_{name} histogram"]
                for (_, labels), counts in sorted(c for c in self.counts.items() if c[0][0] == name):
                    total, sep = 0, "," if labels else ""
                    for bound, n in zip([*map(str, BUCKETS), "+Inf"], counts):
                        total += n
                        lines.append(f'polymodal_{name}_bucket{{{labels}{sep}le="{bound}"}} {total}')
                    braces = f"{{{labels}}}" if labels else ""
                    lines += [f"polymodal_{name}_sum{braces} {self.seconds[name, labels]}",
                              f"polymodal_{name}_count{braces} {total}"]
        for name, value in self.gauges().items():
            lines += [f"# TYPE polymodal_{name} gauge", f"polymodal_{name} {value}"]
        return "\n".join(lines) + "\n"


class RequestLog:
    def __init__(self, app, metrics: Metrics | None = None, stream: TextIO | None = None):
        self.app, self.metrics, self.stream = app, metrics, stream

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in QUIET:
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), []

        async def sending(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - start
            usage = scope.get("state", {}).get("usage")
            usage = usage() if callable(usage) else usage
            tokens = (f" | {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens"
                      if usage else "")
            print(f"{scope['method']} {scope['path']} {status[0] if status else 'no response (client gone)'}"
                  f"{tokens} | {1000 * seconds:.0f} ms", file=self.stream or sys.stdout, flush=True)
            if self.metrics is not None:
                self.metrics.observe(scope["path"], status[0] if status else "gone", seconds, usage)
