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
from polymodal.generation.choice import StopStrings
from polymodal.generation.engine import images_written


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class Answer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], model, push: Callable[[list], None]):
        self.tokenizer, self.push = tokenizer, push
        self.model, self.spans = model, model.image_spans if model is not None else None
        if self.spans is not None and self.spans.begin is None:
            self.spans = None  # a model that cannot draw writes text only
        self.stop = StopStrings(stop)
        self.run: list[int] = []  # the current text run's tokens
        self.image: list[int] | None = None  # inside an image: its tokens so far, `begin` first

    @property
    def stopped(self) -> bool:
        return self.stop.stopped

    def on_token(self, token: int) -> bool:
        events: list = []
        if self.spans is not None and token == self.spans.begin:
            events += self._flush()
            self.image = [token]
        elif self.image is not None:
            self.image.append(token)
            if token == self.spans.end:
                tokens = torch.tensor([self.image])
                events += [("image", png_base64(image))
                           for image in images_written(self.model, tokens[:, :0], None, tokens)[0]]
                self.image = None
        else:
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
        text = self.tokenizer.text(self.run)
        if text.endswith("\ufffd"):  # a character whose bytes are not all written yet
            return []
        out = self.stop.feed(text)
        return [("text", out)] if out else []

    def _flush(self) -> list:
        text = self.stop.flush(self.tokenizer.text(self.run))
        self.run = []
        return [("text", text)] if text else []
