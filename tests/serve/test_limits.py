"""Limits before work: a body over the cap answers 413 before it is read (by its Content-Length, or once what
came goes past the cap), a 5 MB message answers 400 in well under a second (its tokens are counted only up to
the context), and a worker that has stopped makes /health and every request answer 503. After each refusal the
next request is served."""

import http.client
import json
import threading
import time

import pytest
import uvicorn
from conftest import call, free_port
from test_bad_requests import chat

from polymodal.serve.app import Server, create_app
from polymodal.serve.protocol import Limits

LIMIT = 1 << 20


class InProcess:
    """`polymodal serve`'s app on uvicorn in a thread of this process, so the test can reach its worker."""

    def __init__(self, directory, limits: Limits):
        self.server = Server(directory, name="gemini-tiny", slots=1, limits=limits)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(self.server), host="127.0.0.1", port=self.port,
                                                     log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uvicorn.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture
def small(checkpoint):
    server = InProcess(checkpoint, Limits(max_body_bytes=LIMIT))
    yield server
    server.stop()


def test_a_body_over_the_cap_is_refused_before_it_is_read_and_the_next_is_served(small):
    connection = http.client.HTTPConnection("127.0.0.1", small.port, timeout=60)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(10 << 30))  # 10 GiB announced, not a byte of it sent
    connection.endheaders()
    response = connection.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == 413 and error["code"] == "body_too_large", error
    assert error["message"] == (f"the request body is {10 << 30} bytes, over the limit of {LIMIT} bytes "
                                "(polymodal serve --max-body-mb)")
    connection.close()

    connection = http.client.HTTPConnection("127.0.0.1", small.port, timeout=60)  # no length: chunked
    connection.request("POST", "/v1/chat/completions", iter([b" " * (LIMIT // 2)] * 3),
                       {"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == 413 and "over the limit of 1048576 bytes" in error["message"], error
    connection.close()

    status, answer = call(small.url + "/v1/chat/completions", chat(messages=[{"role": "user", "content": "x" * 1000}]
                                                                   * 900))  # just under the cap: read, parsed
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    assert call(small.url + "/v1/chat/completions", chat())[0] == 200


def test_a_stopped_worker_makes_health_and_requests_answer_503(small):
    assert call(small.url + "/health")[0] == 200
    small.server.batcher.close()  # the worker's loop returns: as when it has died
    small.server.thread.join(timeout=60)
    status, health = call(small.url + "/health")
    assert status == 503 and health["status"] == "worker stopped"
    status, error = call(small.url + "/v1/chat/completions", chat())
    assert status == 503 and error["error"]["message"] == ("the model worker has stopped; this server answers no "
                                                           "more requests"), error
    metrics = call_text(small.url + "/metrics")
    assert "polymodal_worker_alive 0\n" in metrics


def call_text(url: str) -> str:
    connection = http.client.HTTPConnection(*url.removeprefix("http://").split("/")[0].split(":"), timeout=60)
    connection.request("GET", "/" + url.split("/", 3)[3])
    return connection.getresponse().read().decode()


@pytest.mark.parametrize("text", [pytest.param("red " * 1_300_000, id="words"),
                                  pytest.param("r" * 5_000_000, id="one-word")])
def test_a_5_mb_message_is_refused_in_well_under_a_second_and_the_next_is_served(live, text):
    body = chat(messages=[{"role": "user", "content": text}])
    assert len(body) > 5_000_000
    start = time.perf_counter()
    status, error = call(live.url + "/v1/chat/completions", body)
    seconds = time.perf_counter() - start
    assert status == 400 and error["error"]["code"] == "context_length_exceeded", error
    assert error["error"]["message"].startswith("the prompt is over 512 tokens (counted to there of its ")
    assert error["error"]["param"] == "messages"
    print(f"5 MB refused in {seconds:.3f} s")
    assert seconds < 1.0, f"{seconds:.2f} s"
    assert call(live.url + "/v1/chat/completions", chat())[0] == 200
