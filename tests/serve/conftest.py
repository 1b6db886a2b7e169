"""A live `polymodal serve` on 127.0.0.1 (a free port) over a tiny random Gemini (it reads images and audio)
written here with its tokenizer, and the real `openai` client pointed at it."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import polymodal as pm
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.data.documents import Document, Segment, wav_bytes
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.generation.prompts import prompts
from polymodal.presets import get_preset

openai = pytest.importorskip("openai", reason="the serve tests talk to the server through the openai client")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the server and `polymodal generate` compute alike
WORLD = World(seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a POST of raw bytes."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def generate_alone(directory: Path, segments: list[Segment], max_new_tokens: int = 8) -> str:
    """What `pm.generate` answers alone (greedy), the prompt laid out as the server and `polymodal generate` lay
    it out."""
    model, tokenizer = pm.from_pretrained(directory), Tokenizer.from_file(directory)
    batch, _ = prompts(make_collator(model.config, tokenizer), [Document(segments)], max_new_tokens)
    tokens = pm.generate(model, **batch, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id)[0].tolist()
    return tokenizer.text(tokens[:tokens.index(tokenizer.eos_id) + 1] if tokenizer.eos_id in tokens else tokens)


def png_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(image, question: str, audio=None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": png_url(image)}}]
    if audio is not None:
        parts.append({"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(audio)).decode(),
                                                             "format": "wav"}})
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """gemini-tiny with random weights (its untied output head answers with varied tokens), reading only:
    the answers these tests expect are text (a drawing model's images: tests/serve/test_answer.py)."""
    directory = tmp_path_factory.mktemp("serve") / "gemini-tiny"
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(WORLD.texts(), vocab_size=320)
    reader = get_preset("gemini-tiny")
    reader = reader.replace(vq=None, tokens=reader.tokens.replace(draw=None))
    pm.save_pretrained(pm.build(fit_to_tokenizer(reader, tokenizer)), directory)
    tokenizer.save(directory)
    return directory


class Live:
    def __init__(self, directory: Path, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "polymodal.cli", "serve", str(directory), "--port",
                                      str(self.port), *map(str, flags)], env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []  # the server's output, line by line, read as it comes (a full pipe would block it)
        self.reader = threading.Thread(target=lambda: self.log.extend(iter(self.proc.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                self.reader.join(timeout=10)
                raise AssertionError(f"polymodal serve exited:\n{''.join(self.log)}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "polymodal serve did not come up in 120 s"
                time.sleep(0.1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def health(self) -> dict:
        return call(self.url + "/health")[1]

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def live(checkpoint):
    server = Live(checkpoint, "--slots", 8)
    yield server
    server.stop()


@pytest.fixture(scope="session", params=["clip-tiny", "siglip-tiny"])
def dual_checkpoint(request, tmp_path_factory) -> Path:
    """A CLIP or SigLIP dual encoder with random weights and the world's tokenizer (named after its preset)."""
    directory = tmp_path_factory.mktemp("serve-dual") / request.param
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(WORLD.texts(), vocab_size=320)
    pm.save_pretrained(pm.build(fit_to_tokenizer(get_preset(request.param), tokenizer)), directory)
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="session")
def dual(dual_checkpoint):
    server = Live(dual_checkpoint)
    yield server
    server.stop()
