"""A Flamingo (cross-attention to its images, not images in the token stream) served: chats with one or two images,
sent together, answer what `pm.generate` answers alone, and the images decide the answer."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import WORLD, Live, generate_alone, png_url

import polymodal as pm
from polymodal.data.documents import Segment
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.collators import fit_to_tokenizer
from polymodal.presets import get_preset

QUESTION = "what colour is the shape?"


@pytest.fixture(scope="module")
def flamingo(tmp_path_factory, open_gates):
    directory = tmp_path_factory.mktemp("serve-flamingo") / "flamingo-tiny"
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(WORLD.texts(), vocab_size=320)
    model = open_gates(pm.build(fit_to_tokenizer(get_preset("flamingo-tiny"), tokenizer)))
    pm.save_pretrained(model, directory)
    tokenizer.save(directory)
    server = Live(directory, "--slots", 4)
    yield directory, server
    server.stop()


def generate(directory, images) -> str:
    return generate_alone(directory, [*(Segment("image", media=image) for image in images), Segment("text", QUESTION)])


def test_chats_with_images_answer_as_pm_generate_alone(flamingo, one_thread):
    directory, server = flamingo
    images = [WORLD.draw(*drawn) for drawn in (("red", "circle"), ("blue", "square"), ("green", "triangle"))]
    asks = [[images[0]], [images[1], images[2]], [images[2]]]

    def chat(given):
        parts = [{"type": "image_url", "image_url": {"url": png_url(image)}} for image in given]
        return server.client.chat.completions.create(
            model="flamingo-tiny", max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}])

    with ThreadPoolExecutor(len(asks)) as pool:  # sent together: they share the batcher's steps
        answers = [r.choices[0].message.content for r in pool.map(chat, asks)]
    assert answers == [generate(directory, given) for given in asks]
    assert len(set(answers)) > 1  # the images decide the answer
