"""Hostile requests to a live `polymodal serve` (the session's server: 8 slots, a queue of 64) through the real
`openai` client: a request asking for more answers (its prompts times n) than the server queues is a 400 before its
prompts are read (a 429 would be retried and never fit; a million one-letter prompts kept the event loop busy for
seconds first), and the next request is served."""

import json
import time

import openai
import pytest
from conftest import call, png_url
from PIL import Image


def test_more_answers_than_the_queue_holds_is_a_400_naming_n(live):
    with pytest.raises(openai.BadRequestError) as refused:
        live.client.completions.create(model="gemini-tiny", prompt=["a red circle"] * 5, n=16, max_tokens=2)
    error = refused.value.body
    assert error["param"] == "n" and error["type"] == "invalid_request_error"
    assert "asks for 80 answers (5 prompts times n=16); the most this server queues is 64" in error["message"]
    answer = live.client.completions.create(model="gemini-tiny", prompt=["a red circle"] * 4, n=16, max_tokens=2)
    assert len(answer.choices) == 64 and {c.finish_reason for c in answer.choices} <= {"stop", "length"}


def test_a_million_prompts_are_refused_before_they_are_read(live):
    """Sent as raw JSON: the openai client itself takes seconds to lay out a million prompts."""
    body = json.dumps({"model": "gemini-tiny", "prompt": ["a"] * 1_000_000, "max_tokens": 1}).encode()
    started = time.monotonic()
    status, refused = call(live.url + "/v1/completions", body)
    took = time.monotonic() - started
    assert status == 400 and refused["error"]["param"] == "prompt"
    assert "1000000 answers" in refused["error"]["message"]
    assert took < 5, f"{took:.1f} s"  # reading them took 15 s and more on a 2-core machine
    assert live.client.completions.create(model="gemini-tiny", prompt="a", max_tokens=1).choices


def chat(messages: list) -> bytes:
    return json.dumps({"model": "gemini-tiny", "messages": messages, "max_tokens": 1}).encode()


PIXEL = png_url(Image.new("RGB", (1, 1)))


@pytest.mark.parametrize("name, messages, counted", [
    # the first part is bad: read in order, it was the error
    ("9 images, the first not one", [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,aGVsbG8="}}] + [{"type": "image_url", "image_url": {"url": PIXEL}}] * 8}],
     "the request has 9 images and audio clips; the limit is 8"),
    ("512 messages, the first a lone surrogate", [{"role": "user", "content": "\ud800"}]
     + [{"role": "user", "content": ""}] * 511, "the messages have 512 parts"),
    ("120000 one-pixel images", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PIXEL}}]
                                  * 120_000}], "the request has 120000 images"),
    ("600000 empty messages", [{"role": "user", "content": ""}] * 600_000, "the messages have 600000 parts")])
def test_too_many_parts_are_refused_before_any_is_read(live, name, messages, counted):
    """Counted before a part is read: 120000 one-pixel images took 5 s to decode, 600000 empty messages 10 s to lay
    out, the event loop held all along; every part is a token at least, so the context bounds them."""
    started = time.monotonic()
    status, refused = call(live.url + "/v1/chat/completions", chat(messages))
    took = time.monotonic() - started
    assert status == 400 and refused["error"]["param"] == "messages" and counted in refused["error"]["message"]
    assert took < 3, f"{took:.1f} s"
    assert call(live.url + "/v1/chat/completions", chat([{"role": "user", "content": "a red circle"}]))[0] == 200
