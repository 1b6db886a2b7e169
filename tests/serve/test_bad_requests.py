"""Every bad request gets an OpenAI-style JSON error with the right status and a message naming the field and
the limit, and the next request is still served; a full queue answers 429; a client that leaves mid-stream
frees its slot; SIGTERM lets running answers finish, then exits."""

import base64
import http.client
import io
import json
import re
import signal
import threading
import time

import pytest
from conftest import WORLD, Live, call, image_message, png_url
from PIL import Image

OK = {"model": "gemini-tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def chat(**fields) -> bytes:
    return json.dumps({**OK, **fields}).encode()


def image_part(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "what is it?"}]}]


def big_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (5000, 4000)).save(buffer, format="PNG")  # 20 M pixels, a few kB compressed
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


BAD = {
    "malformed JSON": (b'{"model": "gemini-tiny", "messages": [', 400, None, "not valid JSON"),
    "not an object": (b"[1, 2]", 400, None, "must be a JSON object, got array"),
    "unknown model": (chat(model="gpt-4o"), 404, "model", "'gpt-4o' does not exist; this server serves 'gemini-tiny'"),
    "unknown field": (chat(tools=[]), 400, "tools", "unknown field 'tools'"),
    "no messages": (chat(messages=[]), 400, "messages", "messages must be a non-empty array"),
    "bad role": (chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role",
                 'must be one of system, developer, user, assistant, got "robot"'),
    "bad temperature": (chat(temperature=3), 400, "temperature", "temperature must be a number in [0, 2], got 3"),
    "bad top_p": (chat(top_p="high"), 400, "top_p", 'top_p must be a number in [0, 1], got "high"'),
    "bad n": (chat(n=0), 400, "n", "n must be an integer in [1, 16], got 0"),
    "bad max_tokens": (chat(max_tokens=0), 400, "max_tokens", "max_tokens must be an integer in [1, 1048576], got 0"),
    "both limits": (chat(max_completion_tokens=3), 400, "max_completion_tokens", "not both"),
    "bad stop": (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "a list of up to 4"),
    "top_logprobs over 20": (chat(logprobs=True, top_logprobs=21), 400, "top_logprobs",
                             "top_logprobs must be an integer in [0, 20], got 21"),
    "top_logprobs without logprobs": (chat(top_logprobs=2), 400, "top_logprobs", "top_logprobs needs logprobs: true"),
    "logprobs a number in a chat": (chat(logprobs=3), 400, "logprobs", "logprobs must be a boolean, got 3"),
    "negative top_k": (chat(top_k=-1), 400, "top_k", "top_k must be an integer in [0, 1048576], got -1"),
    "zero repetition_penalty": (chat(repetition_penalty=0), 400, "repetition_penalty",
                                "repetition_penalty must be a number in [0.01, 100], got 0"),
    "frequency_penalty past 2": (chat(frequency_penalty=2.5), 400, "frequency_penalty",
                                 "frequency_penalty must be a number in [-2, 2], got 2.5"),
    "presence_penalty a string": (chat(presence_penalty="high"), 400, "presence_penalty",
                                  'presence_penalty must be a number in [-2, 2], got "high"'),
    "an http image": (chat(messages=image_part("https://example.com/cat.png")), 400, "messages[0].content[0].image_url",
                      "must be a data: URI (data:image/png;base64,...); the server never fetches from the network"),
    "bad base64": (chat(messages=image_part("data:image/png;base64,@@@not-base64@@@")), 400,
                   "messages[0].content[0].image_url", "is not valid base64"),
    "not an image": (chat(messages=image_part("data:image/png;base64," + base64.b64encode(b"hello").decode())), 400,
                     "messages[0].content[0].image_url", "is not a decodable image"),
    "too many bytes": (chat(messages=image_part("data:image/png;base64," + "A" * (12 << 20))), 413,
                       "messages[0].content[0].image_url", "over the limit of 8388608 bytes"),
    "too many pixels": (chat(messages=image_part(big_png())), 413, "messages[0].content[0].image_url",
                        "is 5000x4000 pixels, over the limit of 16777216 pixels"),
    "too many images": (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": png_url(WORLD.draw("red", "circle"))}}] * 9}]), 400, "messages",
        "has 9 images and audio clips; the limit is 8"),
    "bad audio": (chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"RIFF....WAVE").decode(), "format": "wav"}}]}]), 400,
        "messages[0].content[0].input_audio", "is not a wav file of PCM or float samples"),
    "prompt past the context": (chat(messages=[{"role": "user", "content": "red circle " * 300}], max_tokens=10), 400,
                                "messages", re.compile(r"the prompt is over 512 tokens \(counted to there of its 3300 "
                                                       r"characters\), past the model's context of 512 tokens")),
    "prompt and max_tokens past the context": (chat(messages=[{"role": "user", "content": "red circle " * 20}],
                                                    max_tokens=505), 400, "max_tokens",
                                               re.compile(r"the prompt is \d+ tokens and max_tokens is 505: \d+ in all, "
                                                          "past the model's context of 512 tokens")),
    "max_tokens past the context": (chat(max_tokens=600), 400, "max_tokens", "max_tokens is 600"),
    "prompt alone past the context, max_tokens not given": (  # 512 characters of one token each: not refused unread
        json.dumps({"model": "gemini-tiny", "messages": [{"role": "user", "content": "~" * 512}]}).encode(), 400,
        "messages", re.compile(r"the prompt is \d+ tokens and the least answer \(max_tokens was not given\) is 1: "
                               r"\d+ in all, past the model's context of 512 tokens: shorten messages$")),
}


@pytest.mark.parametrize("name", BAD)
def test_a_bad_request_gets_its_error_and_the_next_is_served(live, name):
    body, status, param, message = BAD[name]
    got, error = call(live.url + "/v1/chat/completions", body)
    assert got == status, error
    assert error["error"]["param"] == param
    found = error["error"]["message"]
    assert message.search(found) if isinstance(message, re.Pattern) else message in found, error
    assert error["error"]["type"] == "invalid_request_error"
    assert call(live.url + "/v1/chat/completions", chat())[0] == 200


def stream_request(url: str, max_tokens: int) -> http.client.HTTPResponse:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    # sampled, seeded: a random model's greedy answer may end at once (an <eos> near the top), a sampled one of
    # 320 tokens hardly ever does, so the request holds its slot while the test looks
    connection.request("POST", "/v1/chat/completions", chat(max_tokens=max_tokens, stream=True, temperature=1,
                                                            seed=0), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    return response


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_full_queue_answers_429_a_client_that_leaves_frees_its_slot_and_sigterm_drains(checkpoint):
    server = Live(checkpoint, "--slots", 1, "--max-queue", 1)
    try:
        running = stream_request(server.url, 500)
        wait_for(lambda: server.health()["running"] == 1)
        queued = []
        threading.Thread(target=lambda: queued.append(call(server.url + "/v1/chat/completions", chat(max_tokens=3))),
                         daemon=True).start()
        wait_for(lambda: server.health()["waiting"] == 1)
        status, error = call(server.url + "/v1/chat/completions", chat())
        assert status == 429 and error["error"]["type"] == "rate_limit_error"
        assert "1 requests are waiting, the most this server queues" in error["error"]["message"]

        running.close()  # leaves mid-stream: its slot goes to the queued request at the next step
        wait_for(lambda: queued)
        reason = queued[0][1]["choices"][0]["finish_reason"]  # sampled (temperature 1): it may write EOS first
        assert queued[0][0] == 200 and reason in ("stop", "length")
        # the batcher counts a request just after its last event is sent: /health may lag a moment
        wait_for(lambda: server.health()["finished"] == {"cancelled": 1, reason: 1})
        assert server.health()["running"] == 0

        draining = stream_request(server.url, 100)  # SIGTERM: this answer still ends whole, then the server exits
        wait_for(lambda: server.health()["running"] == 1)
        server.proc.send_signal(signal.SIGTERM)
        events = [line for line in draining.read().decode().split("\n\n") if line]
        assert events[-1] == "data: [DONE]"
        finished = [json.loads(e[6:]) for e in events[:-1]]
        assert finished[-2]["choices"][0]["finish_reason"] in ("stop", "length") and finished[-1]["usage"]
        assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it drained on
    finally:
        server.stop()


def test_the_page_and_an_image_message_on_the_same_server(live):
    """The chat page is served at /, and a good image message right after all the bad ones is answered."""
    request = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    request.request("GET", "/")
    page = request.getresponse()
    assert page.status == 200 and "<title>polymodal chat</title>" in page.read().decode()
    status, answer = call(live.url + "/v1/chat/completions",
                          chat(messages=image_message(WORLD.draw("red", "circle"), "what colour?")))
    assert status == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")
