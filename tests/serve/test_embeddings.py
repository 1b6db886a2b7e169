"""`/v1/embeddings` through the real `openai` client on a live server of a CLIP and of a SigLIP dual encoder:
texts and images (data URLs) answer the unit vectors `pm` gives for the same inputs, in OpenAI's shape, as
floats or base64; a generative model refuses embeddings and a dual encoder refuses chat, each with a 400
naming what to ask instead."""

import base64
import json

import numpy as np
import pytest
import torch
from conftest import WORLD, call, png_url

import polymodal as pm
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.collators import make_collator

openai = pytest.importorskip("openai")


def reference(directory, inputs) -> tuple[torch.Tensor, int]:
    """The unit vectors of `inputs` (texts, or PIL images) computed here with `pm`, one at a time, and the
    text tokens read."""
    model = pm.from_pretrained(directory).eval()
    collator = make_collator(model.config, Tokenizer.from_file(directory))
    out, tokens = [], 0
    with torch.no_grad():
        for x in inputs:
            if isinstance(x, str):
                batch = collator.texts([collator.format.text(x)])
                tokens += int(batch["attention_mask"].sum())
                out.append(model.encode_text(batch["input_ids"], batch["attention_mask"])[0])
            else:
                out.append(model.encode_image(collator.format.images([x]))[0])
    return torch.stack(out), tokens


def test_texts_and_images_embed_as_pm_does(dual, dual_checkpoint):
    name = dual_checkpoint.name
    images = [WORLD.draw("red", "circle"), WORLD.draw("blue", "square")]
    texts = ["a red circle", "blue", "a green triangle on the left"]
    inputs = [texts[0], png_url(images[0]), texts[1], png_url(images[1]), texts[2]]
    expected, tokens = reference(dual_checkpoint, [texts[0], images[0], texts[1], images[1], texts[2]])

    answer = dual.client.embeddings.create(model=name, input=inputs)  # the client asks for base64 and decodes it
    assert answer.object == "list" and answer.model == name
    assert [d.index for d in answer.data] == list(range(5)) and all(d.object == "embedding" for d in answer.data)
    got = torch.tensor([d.embedding for d in answer.data])
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(5), atol=1e-5)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == tokens

    floats = dual.client.embeddings.create(model=name, input=texts[2], encoding_format="float")
    assert len(floats.data) == 1 and torch.allclose(torch.tensor(floats.data[0].embedding), expected[4], atol=1e-5)
    status, raw = call(dual.url + "/v1/embeddings", f'{{"model": "{name}", "input": "blue"}}'.encode())
    assert status == 200 and torch.allclose(torch.tensor(raw["data"][0]["embedding"]), expected[2], atol=1e-5)
    status, raw = call(dual.url + "/v1/embeddings",
                       f'{{"model": "{name}", "input": "blue", "encoding_format": "base64"}}'.encode())
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert status == 200 and torch.allclose(torch.from_numpy(decoded.copy()), expected[2], atol=1e-5)


@pytest.mark.parametrize("body, param, message", [
    ({"input": 5}, "input", "input must be a string or an array of 1 to 2048 strings"),
    ({"input": []}, "input", "input must be a string or an array"),
    ({"input": ["a", [1, 2]]}, "input", "input must be a string or an array"),
    ({"input": "red " * 100}, "input", "tokens; the model's text tower reads at most 32"),
    ({"input": "data:image/png;base64,@@"}, "input[0]", "is not valid base64"),
    ({"input": "\ud800"}, "input[0]", "lone surrogate"),
    ({"input": "a", "dimensions": 8}, "dimensions", "dimensions is not supported"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", "must be float or base64"),
    ({"input": "a", "extra": 1}, "extra", "unknown field 'extra'"),
])
def test_a_bad_embeddings_request_is_a_400_and_the_next_is_served(dual, dual_checkpoint, body, param, message):
    status, error = call(dual.url + "/v1/embeddings", json.dumps({"model": dual_checkpoint.name, **body}).encode())
    assert status == 400 and error["error"]["type"] == "invalid_request_error", error
    error = error["error"]
    assert error["param"] == param and message in error["message"] and "\n" not in error["message"], error
    assert len(dual.client.embeddings.create(model=dual_checkpoint.name, input="red").data) == 1


def test_each_model_refuses_the_other_kind_of_endpoint(live, dual, dual_checkpoint):
    with pytest.raises(openai.BadRequestError) as info:
        live.client.embeddings.create(model="gemini-tiny", input="a red circle")
    assert info.value.body["param"] == "model"
    assert "writes text; /v1/embeddings needs a CLIP or SigLIP dual encoder" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        dual.client.chat.completions.create(model=dual_checkpoint.name, messages=[{"role": "user", "content": "hi"}])
    assert "is a dual encoder (CLIP / SigLIP): it writes no text; ask /v1/embeddings" in info.value.body["message"]
    assert dual.health()["status"] == "ok" and live.health()["status"] == "ok"
