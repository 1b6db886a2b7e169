"""One choice of a response, token by token: text deltas (stop strings held back), drawn images, the end.

`Answer.on_token` runs in the batcher's thread and hands `push` a list of events, in order:
("text", str), ("image", base64 PNG), then ("done", finish_reason). Text is decoded from the start of the
current text run each time, so a character split over several byte-level tokens appears whole, once.
An image is `begin`, `length` codes, `end` (the model's `ImageSpans`); it is decoded to pixels as soon as
its `end` arrives, so a streamed answer shows it in its place.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import torch
from PIL import Image

from polymodal.data.tokenizer import Tokenizer
from polymodal.generation.batching import Request


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class Answer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], model, push: Callable[[list], None]):
        self.tokenizer, self.stop, self.push = tokenizer, stop, push
        self.model, self.spans = model, getattr(model, "image_spans", None)
        if self.spans is not None and self.spans.begin is None:
            self.spans = None  # a model that cannot draw writes text only
        self.code_of = {int(t): c for c, t in enumerate(self.spans.codes.tolist())} if self.spans else {}
        self.run: list[int] = []  # the current text run's tokens
        self.sent = 0  # characters of the run's text already pushed
        self.codes: list[int] | None = None  # inside an image: its codes so far
        self.stopped = False

    def on_token(self, token: int) -> bool:
        events: list = []
        if self.spans is not None and token == self.spans.begin:
            events += self._flush()
            self.codes = []
        elif self.codes is not None:
            if token == self.spans.end:
                if len(self.codes) == self.spans.length:
                    [[image]] = self.model.images_from_codes([[torch.tensor(self.codes)]])
                    events.append(("image", png_base64(image)))
                self.codes = None
            elif token in self.code_of:
                self.codes.append(self.code_of[token])
        elif token < self.tokenizer.vocab_size:  # a model's vocabulary may be padded past its tokenizer's
            self.run.append(token)
            events += self._text()
        if events:
            self.push(events)
        return not self.stopped

    def on_finish(self, request: Request) -> None:
        events = [] if self.stopped else self._flush()
        reason = request.finish_reason
        if reason == "error":
            events.append(("error", str(request.error)))
        else:
            events.append(("done", "stop" if self.stopped else reason))
        self.push(events)

    def _text(self) -> list:
        text = self.tokenizer.decode(self.run)
        if text.endswith("\ufffd"):  # a character whose bytes are not all written yet
            return []
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                self.stopped = True
                out, self.sent = text[self.sent:at], at
                return [("text", out)] if out else []
        held = max((k for s in self.stop for k in range(len(s), 0, -1) if text.endswith(s[:k])), default=0)
        out = text[self.sent:len(text) - held]
        self.sent += len(out)
        return [("text", out)] if out else []

    def _flush(self) -> list:
        text = self.tokenizer.decode(self.run)[self.sent:]
        self.run, self.sent = [], 0
        return [("text", text)] if text else []
