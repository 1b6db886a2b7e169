"""GET /v1/examples builds its examples (world media rendered, the checkpoint's training record read) off the event
loop: while a build is held up, /health is answered. Held up for real and for as long as the test wants: the
checkpoint's trainer.json is made a named pipe once the server is up, so the build's read of it waits until the test
writes to it; opening the pipe for writing without blocking succeeds only once the build has opened it to read, so
the test knows the build is under way before it asks /health."""

import asyncio
import errno
import json
import os
import shutil
import threading
import time
import urllib.request

from conftest import Live, call

from polymodal.serve.examples import Examples


def open_when_read(pipe) -> int:
    """A write end of `pipe`, once a reader has it open."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            assert e.errno == errno.ENXIO and time.monotonic() < deadline, "no reader opened the pipe in 60 s"
            time.sleep(0.05)


def test_health_is_answered_while_the_examples_are_built(checkpoint, tmp_path):
    directory = shutil.copytree(checkpoint, tmp_path / "gemini-tiny")
    server = Live(directory)
    pipe = directory / "trainer.json"
    os.mkfifo(pipe)
    asked, writer = [], None
    try:
        threading.Thread(target=lambda: asked.append(call(server.url + "/v1/examples")), daemon=True).start()
        writer = open_when_read(pipe)  # the build reads the training record now, and waits for this pipe
        with urllib.request.urlopen(server.url + "/health", timeout=10) as response:  # a blocked loop: timed out
            assert response.status == 200 and json.loads(response.read())["status"] == "ok"
        assert not asked  # the examples are still being built
    finally:
        if writer is None:  # the build never reached the pipe: let nothing wait on it
            writer = os.open(pipe, os.O_RDWR)
        os.write(writer, b"{}")  # no trainer state: the examples of a model not trained on the world
        os.close(writer)
        deadline = time.monotonic() + 60
        while not asked and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()
    status, examples = asked[0]
    assert status == 200 and examples["examples"], examples
    assert "cannot be read" in examples["left_out"][0]["why"]  # what the pipe gave is no training record


class FailingFirst(Examples):
    """Examples whose first build fails (a slow one, so its only waiter can leave first), and later ones work."""

    def __init__(self):
        super().__init__(None)
        self.builds = 0

    def build(self) -> dict:
        self.builds += 1
        time.sleep(0.2)
        if self.builds == 1:
            raise RuntimeError("the first build failed")
        return {"build": self.builds}


def test_a_failed_build_whose_waiters_left_is_built_again():
    async def scenario():
        examples = FailingFirst()
        waiter = asyncio.ensure_future(examples.answer())
        await asyncio.sleep(0.05)
        first = examples.building
        waiter.cancel()  # its client left while the build ran
        await asyncio.wait([first])  # it fails with no one waiting
        return await examples.answer(), examples.builds

    assert asyncio.run(scenario()) == ({"build": 2}, 2)  # the next request is answered by a new build, not the failure
