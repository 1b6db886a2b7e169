"""One choice of a response, token by token: text deltas (stop strings held back), drawn images, the end.

`Answer.on_token` runs in the batcher's thread and hands `push` a list of events, in order:
("text", str), ("image", base64 PNG), then ("done", finish_reason), or ("error", message) when the request
failed or its end could not be made (an unexpected failure reading its places), so its client always gets an
end. Text is decoded from the start of the current text run each time, so a character split over several
byte-level tokens appears whole, once.
An image is `begin`, `length` codes, `end` (the model's `ImageSpans`); it is decoded to pixels as soon as
its `end` arrives, so a streamed answer shows it in its place.

An answer with places (PaliGemma's `<locNNNN>` boxes, `<segNNN>` masks) also gives ("locations", [...])
just before its end, when a `Locator` was given and the whole answer parses to one object or more: each
`{"label", "box": [x1, y1, x2, y2] in pixels of the request's last image, "mask": PNG data URL or None}` (the
shared contract of README, Serving; the mask is mode L, 255 inside, when a mask VQ-VAE decodes it; None when
its codes lie past the VAE's codebook).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from polymodal.data.locations import has_location_tokens, parse_locations
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.mask_vae import MaskVAE
from polymodal.generation.batching import Request
from polymodal.generation.choice import StopStrings
from polymodal.generation.engine import images_written


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass(frozen=True)
class Locator:
    """What an answer's places refer to: the (height, width) of the request's last image, and the mask VQ-VAE
    that decodes segmentation tokens (None: their masks are left out, the boxes kept)."""

    image_size: tuple[int, int]
    vae: MaskVAE | None = None

    def __call__(self, text: str) -> list[dict] | None:
        found = parse_locations(text, self.image_size, self.vae, boxes_only=self.vae is None)
        return [{"label": o.label, "box": [float(v) for v in o.box], "mask": None if o.mask is None else
                 "data:image/png;base64," + png_base64(Image.fromarray(o.mask.numpy().astype(np.uint8) * 255))}
                for o in found.objects] or None


class Answer:
    """`whole`: the client reads the answer only at its end (not streamed, no logprobs); with no stop string to
    watch for and no image to draw, its text is then decoded once, at the end, and only the first token is told
    before it (an empty text event, for the time-to-first-token metric)."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], model, push: Callable[[list], None],
                 locate: Locator | None = None, whole: bool = False):
        self.tokenizer, self.push, self.locate = tokenizer, push, locate
        self.written: list[str] = []  # the text pushed so far, for the places of the whole answer
        self.model, self.spans = model, model.image_spans if model is not None else None
        if self.spans is not None and self.spans.begin is None:
            self.spans = None  # a model that cannot draw writes text only
        self.whole = whole and not stop and self.spans is None
        self.stop = StopStrings(stop)
        self.run: list[int] = []  # the current text run's tokens
        self.image: list[int] | None = None  # inside an image: its tokens so far, `begin` first

    @property
    def stopped(self) -> bool:
        return self.stop.stopped

    def on_token(self, token: int) -> bool:
        if self.whole:
            if not self.run:
                self.push([("text", "")])
            self.run.append(token)
            return True
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
        """The answer's end; if it cannot be made (an unexpected failure of its places), the text held back is still
        sent, then an error, and the request counts as an error (the batcher counts it after this call)."""
        events: list = []
        try:
            if not self.stopped:
                events += self._flush()
            events += self._ending(request)
        except Exception as e:  # noqa: BLE001 - its client waits for an end: it gets this error as one
            request.finish_reason, request.error = "error", e
            events.append(("error", f"the answer was written but could not be finished: {e}"))
        self.push(events)

    def _ending(self, request: Request) -> list:
        if request.finish_reason == "error":
            return [("error", str(request.error))]
        places = self.locate("".join(self.written)) if self.locate is not None else None
        return ([("locations", places)] if places else []) + [
            ("done", "stop" if self.stopped else request.finish_reason)]

    def _text(self) -> list:
        text = self.tokenizer.text(self.run)
        if text.endswith("\ufffd"):  # a character whose bytes are not all written yet
            return []
        out = self.stop.feed(text)
        if out:
            self.written.append(out)
        return [("text", out)] if out else []

    def _flush(self) -> list:
        text = self.stop.flush(self.tokenizer.text(self.run))
        self.run = []
        self.written.append(text)
        return [("text", text)] if text else []
