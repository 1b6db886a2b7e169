"""A drawing model through a live `polymodal serve`: a gemini-tiny whose weights are set so that its greedy answer
is "a red", then a drawing (`<draw>`, 64 codes, `</draw>`), then `<eos>` (tests/scripted_paligemma.py's `script`).
The chat answer's `content` is then the list of parts the README gives, the text then the image as a PNG data URL
whose pixels are the image `pm.generate(..., return_images=True)` draws alone; streamed, the image is a chunk whose
`delta.content` is a list of that one part."""

import base64
import io
import json
import urllib.request

import numpy as np
import pytest
import torch
from conftest import WORLD, Live, call
from PIL import Image
from scripted_paligemma import script

import polymodal as pm
from polymodal.data.documents import Document, Segment
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.generation.prompts import prompts
from polymodal.presets import get_preset

PROMPT = "draw a red circle in the top left"


@pytest.fixture(scope="module")
def drawing(tmp_path_factory):
    """(directory, the answer's text, the image `pm.generate` draws alone)."""
    directory = tmp_path_factory.mktemp("drawing") / "gemini-tiny"
    tokenizer = Tokenizer.train(WORLD.texts(), vocab_size=320)
    torch.manual_seed(0)
    model = pm.build(fit_to_tokenizer(get_preset("gemini-tiny"), tokenizer))
    spans = model.image_spans
    text = tokenizer.encode("a red")
    script(model.decoder, text + [spans.begin, spans.end, tokenizer.eos_id])
    pm.save_pretrained(model, directory)
    tokenizer.save(directory)
    batch, _ = prompts(make_collator(model.config, tokenizer), [Document([Segment("text", PROMPT)])], 80)
    out = pm.generate(model, **batch, max_new_tokens=80, eos_token_id=tokenizer.eos_id, return_images=True)
    [[image]] = out.images
    assert out.tokens[0].tolist().count(spans.end) == 1
    return directory, tokenizer.decode(text), image


def pixels(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix), url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix):]))).convert("RGB"))


def test_a_drawn_image_comes_back_in_its_place_whole_and_streamed(drawing):
    directory, text, image = drawing
    server = Live(directory)
    body = {"model": "gemini-tiny", "temperature": 0, "max_tokens": 80,
            "messages": [{"role": "user", "content": PROMPT}]}
    try:
        status, reply = call(server.url + "/v1/chat/completions", json.dumps(body).encode())
        request = urllib.request.Request(server.url + "/v1/chat/completions",
                                         data=json.dumps({**body, "stream": True}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            events = [line[len(b"data: "):] for line in response.read().splitlines() if line.startswith(b"data: ")]
    finally:
        server.stop()
    assert status == 200, reply
    parts = reply["choices"][0]["message"]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url"], parts
    assert parts[0]["text"].strip() == text.strip()
    assert np.array_equal(pixels(parts[1]["image_url"]["url"]), np.asarray(image.convert("RGB")))

    assert events[-1] == b"[DONE]"
    deltas = [c["choices"][0]["delta"].get("content") for c in map(json.loads, events[:-1]) if c["choices"]]
    drawn = [d for d in deltas if isinstance(d, list)]
    assert len(drawn) == 1 and [p["type"] for p in drawn[0]] == ["image_url"], deltas
    assert pixels(drawn[0][0]["image_url"]["url"]).tobytes() == pixels(parts[1]["image_url"]["url"]).tobytes()
    assert "".join(d for d in deltas if isinstance(d, str)).strip() == text.strip()
