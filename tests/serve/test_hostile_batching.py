"""Hostile requests to a live `polymodal serve` (the session's server: 8 slots, a queue of 64) through the real
`openai` client: a request asking for more answers (its prompts times n) than the server queues is a 400 before its
prompts are read (a 429 would be retried and never fit; a million one-letter prompts kept the event loop busy for
seconds first), and the next request is served."""

import json
import time

import openai
import pytest
from conftest import call


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
