"""Answers a live `polymodal serve` cannot take at face value, from real checkpoints whose greedy answer is set by
hand (tests/scripted_paligemma.py), through real HTTP: an answer whose mask codes lie past its model's mask VQ-VAE
codebook keeps its text and its box, the mask null, streamed or not; an answer of characters split over several
byte-level tokens gives each token's real bytes in its logprobs, which join into the answer's UTF-8. Without HTTP, in
a real batcher: an answer whose end cannot be made (its places fail unexpectedly) still sends the text held back,
then one error, and counts as an error."""

import json
import time
import urllib.request

import pytest
from conftest import Live, call, image_message
from scripted_paligemma import SIDE, write_scripted_paligemma

import polymodal as pm
from polymodal.data.documents import Document, Segment
from polymodal.data.locations import bins_to_box, box_to_bins, format_object
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.mask_vae import MaskVAE, MaskVAEConfig
from polymodal.families.collators import make_collator
from polymodal.generation.batching import Batcher, Request
from polymodal.generation.prompts import prompts
from polymodal.serve.answer import Answer, Locator

BOX = (4, 6, 20, 30)  # (x1, y1, x2, y2) in pixels of a 32x32 image
SMALL_VAE = MaskVAEConfig(mask_size=32, hidden_dim=8, n_down=3, n_res_blocks=1, codebook_dim=32, codebook_size=16)
IMAGE = World(seed=0).draw("red", "circle")
SEGMENTED = format_object(BOX, SIDE, "red circle", list(range(3, 19)))
ACCENTED = "é日"  # two and three UTF-8 bytes, each byte its own token of the world's BPE


def chat(max_tokens: int, **fields) -> bytes:
    return json.dumps({"model": "scripted", "messages": image_message(IMAGE, "segment red circle"),
                       "max_tokens": max_tokens, "temperature": 0, **fields}).encode()


@pytest.fixture(scope="module")
def undecodable(tmp_path_factory):
    """A model that answers a box and a mask whose codes reach 18, holding a mask VQ-VAE of 16 codes."""
    directory = tmp_path_factory.mktemp("undecodable") / "scripted"
    write_scripted_paligemma(directory, SEGMENTED, SMALL_VAE)
    server = Live(directory)
    yield server
    server.stop()


def test_a_mask_its_vae_cannot_decode_keeps_the_text_and_the_box(undecodable):
    url = undecodable.url + "/v1/chat/completions"
    box = list(bins_to_box(box_to_bins(BOX, SIDE), SIDE))
    status, answer = call(url, chat(40))
    assert status == 200, answer
    message = answer["choices"][0]["message"]
    assert message["content"] == SEGMENTED and message["locations"] == [{"label": "red circle", "box": box,
                                                                         "mask": None}]
    request = urllib.request.Request(url, data=chat(40, stream=True), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [line.removeprefix("data: ") for line in response.read().decode().splitlines() if line]
    assert events[-1] == "[DONE]" and not any(e.startswith('{"error"') for e in events), events
    deltas = [c for e in events[:-1] for c in json.loads(e)["choices"]]
    assert "".join(d["delta"].get("content", "") for d in deltas) == SEGMENTED
    assert deltas[-1]["finish_reason"] == "stop" and deltas[-1]["delta"]["locations"][0]["mask"] is None
    # the batcher counts a request just after its last event is sent (`Batcher._finish`): /health may lag a moment
    deadline = time.monotonic() + 10
    while undecodable.health()["finished"] != {"stop": 2} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert undecodable.health()["finished"] == {"stop": 2}


def test_an_end_that_cannot_be_made_sends_the_held_back_text_then_one_error_counted_as_one(tmp_path):
    """Its places read with a mask VQ-VAE of 64 codes a mask, whose decode refuses PaliGemma's 16: an unexpected
    failure at the end. "circle", the answer's last word, could begin the stop string: held back until the end."""
    write_scripted_paligemma(tmp_path, SEGMENTED)
    model, tokenizer = pm.from_pretrained(tmp_path), Tokenizer.from_file(tmp_path)
    inputs, wanted = prompts(make_collator(model.config, tokenizer),
                             [Document([Segment("image", media=IMAGE), Segment("text", "segment red circle")])], 40)
    del inputs["attention_mask"]
    events: list = []
    locate = Locator((SIDE, SIDE), MaskVAE(MaskVAEConfig(mask_size=64, n_down=3)))
    answer = Answer(tokenizer, ("circle and",), model, events.extend, locate)
    request = Request(inputs, max_new_tokens=wanted, stop_token_ids=(tokenizer.eos_id,), on_token=answer.on_token,
                      on_finish=answer.on_finish)
    batcher = Batcher(model, slots=1, max_len=make_collator(model.config, tokenizer).format.max_len)
    batcher.submit(request)
    while not batcher.idle():
        batcher.step()
    assert "".join(v for k, v in events if k == "text") == SEGMENTED  # "circle" included
    assert [k for k, _ in events][-1] == "error" and [k for k, _ in events].count("error") == 1
    assert "could not be finished" in events[-1][1] and "codes must be (batch, 64)" in events[-1][1]
    assert request.finish_reason == "error" and batcher.finished == {"error": 1}  # what /health counts


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
