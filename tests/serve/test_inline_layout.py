"""Which requests `polymodal serve` lays out on its event loop (short text, small images: cheaper than a hop to a
worker thread, which waits for the GIL beside the batcher) and which off it (long text, large images, audio)."""

import base64

from conftest import WORLD, image_message
from PIL import Image

from polymodal.data.documents import wav_bytes
from polymodal.serve.app import INLINE_IMAGE_PIXELS, INLINE_PROMPT_CHARS, _inline
from polymodal.serve.protocol import Limits, chat_job

SMALL = WORLD.draw("red", "circle")


def job(content) -> object:
    return chat_job({"model": "m", "messages": [{"role": "user", "content": content}]}, "m", Limits())


def test_short_text_and_small_images_are_laid_out_on_the_loop():
    assert SMALL.width * SMALL.height <= INLINE_IMAGE_PIXELS
    assert _inline(job("what is the shape?"))
    assert _inline(job(image_message(SMALL, "what colour is the shape?")[0]["content"]))
    assert _inline(job(image_message(SMALL.resize((256, 256)), "what colour?")[0]["content"]))


def test_long_text_large_images_and_audio_are_laid_out_off_the_loop():
    assert not _inline(job("a" * (INLINE_PROMPT_CHARS + 1)))
    assert not _inline(job(image_message(SMALL.resize((257, 256)), "what colour?")[0]["content"]))
    assert not _inline(job(image_message(Image.new("RGB", (1024, 768)), "what colour?")[0]["content"]))
    audio = WORLD.sample("audio_count", 0).document.audios[0]
    parts = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(audio)).decode(),
                                                     "format": "wav"}}, {"type": "text", "text": "how many beeps?"}]
    assert not _inline(job(parts))
