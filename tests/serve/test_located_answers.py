"""Answers a live `polymodal serve` cannot take at face value, from real checkpoints whose greedy answer is set by
hand (tests/scripted_paligemma.py), through real HTTP: an answer whose end cannot be read (its mask codes lie past
its model's mask VQ-VAE codebook) gets a 500 with a one-line message, or an error event on a stream, and the next
request is served; an answer of characters split over several byte-level tokens gives each token's real bytes in
its logprobs, which join into the answer's UTF-8."""

import json
import urllib.request

import pytest
from conftest import Live, call, image_message
from scripted_paligemma import SIDE, write_scripted_paligemma

from polymodal.data.locations import bins_to_box, box_to_bins, format_object
from polymodal.data.synthetic import World
from polymodal.encoders.mask_vae import MaskVAEConfig

BOX = (4, 6, 20, 30)  # (x1, y1, x2, y2) in pixels of a 32x32 image
SMALL_VAE = MaskVAEConfig(mask_size=32, hidden_dim=8, n_down=3, n_res_blocks=1, codebook_dim=32, codebook_size=16)
IMAGE = World(seed=0).draw("red", "circle")
ACCENTED = "é日"  # two and three UTF-8 bytes, each byte its own token of the world's BPE


def chat(max_tokens: int, **fields) -> bytes:
    return json.dumps({"model": "scripted", "messages": image_message(IMAGE, "segment red circle"),
                       "max_tokens": max_tokens, "temperature": 0, **fields}).encode()


@pytest.fixture(scope="module")
def undecodable(tmp_path_factory):
    """A model that answers a box and a mask whose codes reach 18, holding a mask VQ-VAE of 16 codes."""
    directory = tmp_path_factory.mktemp("undecodable") / "scripted"
    write_scripted_paligemma(directory, format_object(BOX, SIDE, "red circle", list(range(3, 19))), SMALL_VAE)
    server = Live(directory)
    yield server
    server.stop()


def test_an_answer_whose_end_cannot_be_read_is_an_error_and_the_next_request_is_served(undecodable):
    url = undecodable.url + "/v1/chat/completions"
    status, answer = call(url, chat(40))  # urllib's timeout: a client left waiting fails here
    assert status == 500, answer
    message = answer["error"]["message"]
    assert "could not be finished" in message and "codes must be in [0, 16)" in message, message
    assert "\n" not in message and "Traceback" not in message

    request = urllib.request.Request(url, data=chat(40, stream=True), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [line.removeprefix("data: ") for line in response.read().decode().splitlines() if line]
    errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
    assert len(errors) == 1 and "codes must be in [0, 16)" in errors[0]["message"], events
    assert events[-1] == "[DONE]"

    status, answer = call(url, chat(4))  # the four location tokens alone: a box without a mask
    assert status == 200, answer
    [place] = answer["choices"][0]["message"]["locations"]
    assert place["box"] == list(bins_to_box(box_to_bins(BOX, SIDE), SIDE)) and place["mask"] is None
    assert undecodable.health()["status"] == "ok"


@pytest.fixture(scope="module")
def accented(tmp_path_factory):
    directory = tmp_path_factory.mktemp("accented") / "scripted"
    ids = write_scripted_paligemma(directory, ACCENTED)
    assert len(ids) == len(ACCENTED.encode())  # one token per byte: every character is split
    server = Live(directory)
    yield server
    server.stop()


def test_logprobs_give_each_token_s_own_bytes(accented):
    status, answer = call(accented.url + "/v1/chat/completions", chat(20, logprobs=True, top_logprobs=2))
    assert status == 200, answer
    choice = answer["choices"][0]
    assert choice["message"]["content"] == ACCENTED and choice["finish_reason"] == "stop"
    *written, end = choice["logprobs"]["content"]
    assert end["token"] == "<eos>" and bytes(end["bytes"]) == b"<eos>"
    assert [bytes(e["bytes"]) for e in written] == [bytes([b]) for b in ACCENTED.encode()]
    assert all(e["token"] == "\ufffd" for e in written)  # no token is a whole character: its text says so
    assert bytes(written[0]["top_logprobs"][0]["bytes"]) == bytes(written[0]["bytes"])  # its most likely, itself
