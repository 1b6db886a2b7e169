"""One log line per HTTP request the server answers: method, path, status, tokens, latency.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which wraps every response in a stream of its
own): it watches the status go out and writes the line when the last byte has gone, so a streamed answer is
timed to its end. The endpoint leaves its token counts in the request's state as `usage` (OpenAI's usage
dict); `/health` polls are not logged.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

QUIET = ("/health",)


class RequestLog:
    def __init__(self, app, stream: TextIO | None = None):
        self.app, self.stream = app, stream

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
            usage = scope.get("state", {}).get("usage")
            usage = usage() if callable(usage) else usage
            tokens = (f" | {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens"
                      if usage else "")
            print(f"{scope['method']} {scope['path']} {status[0] if status else 'no response (client gone)'}"
                  f"{tokens} | {1000 * (time.perf_counter() - start):.0f} ms", file=self.stream or sys.stdout,
                  flush=True)
