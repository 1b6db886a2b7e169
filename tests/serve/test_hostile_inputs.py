"""Media and request bodies as demanding users send them, to a live `polymodal serve` through real HTTP and the real
`openai` client: each gets the answer its content means, or a 400 naming what is wrong; never a 500, never a silently
wrong answer. Each case was a 500 or a wrong answer before its fix (named in its test)."""

import base64
import io
import json
import math
import threading
import time

import numpy as np
import pytest
import torch
from conftest import WORLD, Live, call, image_message, openai
from hostile_media import float_wav, png_with_exif
from PIL import Image

import polymodal as pm
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.collators import fit_to_tokenizer
from polymodal.presets import get_preset

QUESTION = "what colour is the shape?"


def ask(live, content: list[dict]) -> str:
    answer = live.client.chat.completions.create(model="gemini-tiny", max_tokens=8, temperature=0,
                                                 messages=[{"role": "user", "content": content}])
    return answer.choices[0].message.content


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def test_a_png_with_a_broken_exif_chunk_answers_as_the_png_without_it(live):
    """Pillow raised SyntaxError reading the EXIF block (an eXIf chunk that is no TIFF header): a 500."""
    image, buffer = WORLD.draw("red", "circle"), io.BytesIO()
    image.save(buffer, format="PNG")
    broken = png_with_exif(image, b"garbage!garbage!")
    text = {"type": "text", "text": QUESTION}
    assert ask(live, [image_part(broken), text]) == ask(live, [image_part(buffer.getvalue()), text])


def test_a_float_wav_past_full_scale_answers_as_its_clipped_sound(live):
    """Samples of 1e30 made the log-mel's power overflow: NaN features, and a 500 from the model's input check."""
    t = np.arange(8000) / 16000
    loud = (np.sin(2 * np.pi * 440 * t) * 1e30).astype(np.float32)

    def audio(samples):
        return {"type": "input_audio", "input_audio": {"data": base64.b64encode(float_wav(samples)).decode(),
                                                       "format": "wav"}}

    text = {"type": "text", "text": "how many beeps?"}
    assert ask(live, [audio(loud), text]) == ask(live, [audio(np.clip(loud, -1, 1)), text])


@pytest.mark.parametrize("temperature", [1e-40, 5e-324], ids=["float32-overflow", "float32-zero"])
def test_a_temperature_near_0_samples_the_most_likely_token(live, temperature):
    """Sampling as the temperature goes to 0 is greedy. 3.0 / 1e-40 overflowed float32 to inf and 5e-324 rounded to
    0: every probability was NaN, and every token written was id 0 (<pad>), with status 200."""
    completion = dict(model="gemini-tiny", prompt="two blue squares and", max_tokens=8)
    greedy = live.client.completions.create(**completion, temperature=0).choices[0].text
    sampled = live.client.completions.create(**completion, temperature=temperature, seed=7, logprobs=2).choices[0]
    assert sampled.text == greedy
    assert all(math.isfinite(lp) for lp in sampled.logprobs.token_logprobs)


def test_an_integer_past_python_s_4300_digits_is_a_400(live):
    """json.loads raises a plain ValueError for it (not a JSONDecodeError): a 500."""
    body = b'{"model": "gemini-tiny", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}"
    status, answer = call(live.url + "/v1/completions", body)
    assert status == 400 and "4300 digits" in answer["error"]["message"], answer
    assert call(live.url + "/v1/completions", json.dumps(
        {"model": "gemini-tiny", "prompt": "hi", "max_tokens": 2}).encode())[0] == 200


def test_a_request_with_large_images_is_read_off_the_event_loop(live):
    """Eight 4096x4096 PNGs took 1.5 s of CPU to decode, on the event loop: every stream and /health stopped for as
    long, 0.4 to 0.7 of the request's time; read off the loop, /health waits about 1/70 of it. Measured against the
    request's own time, so a loaded machine slows both sides alike. (About 4 s: the images are decoded.)"""
    ramp = np.arange(4096).astype(np.uint8)  # 0..255, 16 times
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[None, :] * ramp[:, None]), -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    body = json.dumps({"model": "gemini-tiny", "max_tokens": 1, "messages": [
        {"role": "user", "content": [image_part(buffer.getvalue())] * 8 + [{"type": "text", "text": QUESTION}]}]})
    waits, done = [], threading.Event()

    def poll():
        while not done.is_set():
            start = time.perf_counter()
            call(live.url + "/health")
            waits.append(time.perf_counter() - start)

    poller = threading.Thread(target=poll)
    poller.start()
    start = time.perf_counter()
    status, answer = call(live.url + "/v1/chat/completions", body.encode())
    took = time.perf_counter() - start
    done.set()
    poller.join()
    assert status == 200, answer
    assert max(waits) < took / 8, f"/health waited {max(waits):.2f} s during a request of {took:.2f} s"


@pytest.fixture(scope="module")
def paligemma(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve-paligemma") / "paligemma-tiny"
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(WORLD.texts(), vocab_size=320)
    pm.save_pretrained(pm.build(fit_to_tokenizer(get_preset("paligemma-tiny"), tokenizer)), directory)
    tokenizer.save(directory)
    server = Live(directory, "--slots", 2)
    yield server
    server.stop()


def test_a_model_that_answers_about_an_image_refuses_a_prompt_without_one(paligemma):
    """PaliGemma's prompt is its image, then the question: `polymodal generate` and HF's processor refuse one without
    an image; the server answered it (200) from the question alone."""
    with pytest.raises(openai.BadRequestError) as chat:
        paligemma.client.chat.completions.create(model="paligemma-tiny", max_tokens=2,
                                                 messages=[{"role": "user", "content": QUESTION}])
    assert chat.value.param == "messages" and "needs an image_url part" in chat.value.message
    with pytest.raises(openai.BadRequestError) as completion:
        paligemma.client.completions.create(model="paligemma-tiny", prompt=QUESTION, max_tokens=2)
    assert completion.value.param == "prompt"
    answer = paligemma.client.chat.completions.create(model="paligemma-tiny", max_tokens=2,
                                                      messages=image_message(WORLD.draw("red", "circle"), QUESTION))
    assert answer.choices[0].finish_reason in ("stop", "length")
