"""GET /v1/examples: what the served model can be asked, for the chat page to offer as one-click examples.

A run trained on the built-in world gets one question per task it trained on (the tasks its checkpoint's
trainer.json records, as `polymodal eval` reads them), each about held-out media: the first example of the
world's eval split, which training never shows. Any other model gets a fallback built from what its document
format reads (a world image, a world sound, or text alone). Beside the examples, how the model converses, from
its family spec: `single_turn` (one prompt, then one answer: each question is asked fresh, with the last image)
and `needs_image` (every prompt carries an image). Media are content parts of the chat API (`image_url` data
URLs, base64 wav `input_audio`), so a page sends an example as it came.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from polymodal.data.documents import Document, Segment, wav_bytes
from polymodal.data.synthetic import WORLD
from polymodal.errors import PolymodalError
from polymodal.families import spec_of
from polymodal.runs import resolve
from polymodal.serve.answer import png_base64
from polymodal.train.checkpoint import read_trainer_state
from polymodal.train.trainer import IMAGE_TASKS

CARRIED = ("image", "audio")  # the media kinds a chat message carries (protocol.py): no video part exists
FALLBACK = {"image": ("caption", "colour"), "audio": ("audio_pitch",)}  # world tasks any reader of that kind may try
TEXT_PROMPT = "Tell me about red circles and blue squares."


def world_tasks(directory: Path) -> tuple[str, ...] | None:
    """The world tasks the checkpoint in `directory` trained on, or None when it did not train on the world (or
    says nothing of its training: a converted or hand-saved model)."""
    try:
        config = read_trainer_state(directory).get("train_config", {})
    except FileNotFoundError:
        return None
    if config.get("data", "world") != "world":
        return None
    return tuple(config.get("tasks", IMAGE_TASKS))


def content_part(segment: Segment) -> dict:
    """A prompt segment as a chat content part."""
    if segment.kind == "text":
        return {"type": "text", "text": segment.text}
    if segment.kind == "image":
        return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_base64(segment.media)}"}}
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(segment.media)).decode(),
                                                   "format": "wav"}}


def world_example(task: str) -> dict | None:
    """The task's first held-out question as {"task", "content", "answer"} (the answer the world gives it; for
    a drawing task, what the drawing must show); None when it needs media a chat message cannot carry (video)."""
    example = WORLD.sample(task, 0, "eval")
    prompt = [s for s in example.document.segments if not s.target]
    if any(s.kind != "text" and s.kind not in CARRIED for s in prompt):
        return None
    return {"task": task, "content": [content_part(s) for s in prompt], "answer": example.answer}


def reads(fmt, kind: str) -> bool:
    """Whether the document format lays out a prompt holding one `kind` medium (its own check, as a request's)."""
    medium = WORLD.sample(FALLBACK[kind][0], 0, "eval").document.segments[0]
    try:
        fmt.encode(Document([medium, Segment("text", "?")]), prompt_only=True)
    except ValueError:  # DocumentError or InputError: the format does not read it
        return False
    return True


class Examples:
    """The served model's examples and conversation rules, built once, on the first request, in a worker thread:
    rendering media and reading the run's records never hold up the event loop (other requests are answered
    meanwhile); requests that come while it builds wait for the same build. The route answers the same dict."""

    def __init__(self, server):
        self.server, self.building = server, None

    async def answer(self) -> dict:
        if self.building is None:
            self.building = asyncio.ensure_future(run_in_threadpool(self.build))
            self.building.add_done_callback(self._forget_failed)
        return await asyncio.shield(self.building)  # a client that leaves does not cancel the build

    def _forget_failed(self, building: asyncio.Future) -> None:
        """A failed build is forgotten as it ends, whether or not anyone still waits for it: the next request builds
        again."""
        if (building.cancelled() or building.exception() is not None) and self.building is building:
            self.building = None

    def build(self) -> dict:
        server = self.server
        spec = spec_of(server.model)
        out = {"model": server.name, "chat": spec.generates, "single_turn": spec.single_turn,
               "needs_image": spec.needs_image, "reads": [], "source": None, "examples": [], "left_out": []}
        if not spec.generates:
            out["source"] = "a dual encoder writes no text: ask /v1/embeddings"
            return out
        out["reads"] = [kind for kind in CARRIED if reads(server.collator.format, kind)]
        try:
            tasks = world_tasks(resolve(server.directory)[0])
        except (PolymodalError, OSError, ValueError) as e:  # a damaged trainer.json: offered as any other model
            out["left_out"].append({"task": None, "why": f"the run's training record cannot be read ({e})"})
            tasks = None
        trained = tasks is not None
        if trained:
            out["source"] = "one held-out question per task the run trained on (the built-in world's eval split)"
        else:
            out["source"] = "the built-in world's held-out media, for a model not trained on it"
            tasks = [task for kind in out["reads"] for task in FALLBACK[kind]]
        for task in tasks:
            try:
                example = world_example(task)
            except (PolymodalError, ValueError) as e:  # a task this world does not know
                out["left_out"].append({"task": task, "why": str(e)})
                continue
            if example is None:
                out["left_out"].append({"task": task, "why": "its media (video) cannot travel in a chat message"})
            else:
                out["examples"].append(example if trained else {**example, "answer": None})
        if not out["examples"] and not spec.needs_image:
            out["examples"].append({"task": None, "content": [{"type": "text", "text": TEXT_PROMPT}], "answer": None})
        return out
