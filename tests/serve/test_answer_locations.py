"""Places in an answer (`serve.answer.Locator`, the shared contract of README, Serving): a PaliGemma-style answer
of location (and segmentation) tokens, fed token by token through `Answer` with a real tokenizer, ends with a
("locations", ...) event just before its end: labels, boxes in pixels of the request's last image, masks as
PNG data URLs decoded by a mask VQ-VAE (none without one). Through a live server: tests/e2e/test_detection_finetune.py."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.data.locations import add_location_tokens, format_locations, format_object, parse_locations
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.mask_vae import MaskVAE
from polymodal.serve.answer import Answer, Locator, has_location_tokens

from test_answer import feed

SIZE = (48, 64)  # (height, width) of the request's last image
TOKENIZER = Tokenizer.train(World(seed=0).texts(), vocab_size=320)
add_location_tokens(TOKENIZER)
CODES = list(range(3, 19))
ANSWER = format_locations([format_object((4, 6, 40, 30), SIZE, "red circle", CODES),
                           format_object((0, 0, 64, 48), SIZE, "blue square")])


def png(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(url.removeprefix("data:image/png;base64,"))))
    assert image.mode == "L" and image.size == (SIZE[1], SIZE[0])
    return np.asarray(image)


def test_an_answer_s_boxes_and_masks_come_before_its_end():
    torch.manual_seed(0)
    vae = MaskVAE().eval()
    events, _, _ = feed(Answer(TOKENIZER, (), None, None, Locator(SIZE, vae)), TOKENIZER.encode(ANSWER), "stop")
    assert [k for k, _ in events[-2:]] == ["locations", "done"]
    assert "".join(v for k, v in events if k == "text") == ANSWER
    places, truth = events[-2][1], parse_locations(ANSWER, SIZE, vae).objects
    assert [p["label"] for p in places] == ["red circle", "blue square"]
    assert [p["box"] for p in places] == [list(o.box) for o in truth]
    assert places[0]["box"] == pytest.approx([4, 6, 40, 30], abs=64 / 1023)  # in pixels, x/y order
    mask = png(places[0]["mask"])
    assert set(np.unique(mask)) == {0, 255} and np.array_equal(mask == 255, truth[0].mask.numpy())
    assert places[1]["mask"] is None  # no segmentation tokens: no mask


def test_without_a_mask_vae_the_boxes_stay_and_masks_are_null():
    events, _, _ = feed(Answer(TOKENIZER, (), None, None, Locator(SIZE)), TOKENIZER.encode(ANSWER), "stop")
    places = events[-2][1]
    assert [p["mask"] for p in places] == [None, None]
    assert [p["box"] for p in places] == [list(o.box) for o in parse_locations(ANSWER, SIZE, MaskVAE()).objects]


def test_without_a_mask_vae_a_partial_mask_is_no_object():
    """The boxes of whole objects are kept, but an object with eight of its sixteen segmentation tokens is a
    malformed answer (big_vision's invalid), not a box whose broken mask is hidden."""
    whole = format_object((4, 6, 40, 30), SIZE, "red circle", CODES)
    partial = format_object((0, 0, 64, 48), SIZE, "blue square", CODES).replace("".join(
        f"<seg{c:03d}>" for c in CODES[8:]), "")
    events, _, _ = feed(Answer(TOKENIZER, (), None, None, Locator(SIZE)), TOKENIZER.encode(partial), "stop")
    assert [k for k, _ in events].count("locations") == 0
    events, _, _ = feed(Answer(TOKENIZER, (), None, None, Locator(SIZE)),
                        TOKENIZER.encode(format_locations([whole, partial])), "stop")
    assert [p["label"] for p in events[-2][1]] == ["red circle"]


@pytest.mark.parametrize("text", ["a red circle", "<loc0010><loc0020> half a box", ""])
def test_an_answer_without_places_has_no_locations_event(text):
    events, _, _ = feed(Answer(TOKENIZER, (), None, None, Locator(SIZE)), TOKENIZER.encode(text), "stop")
    assert [k for k, _ in events].count("locations") == 0 and events[-1] == ("done", "stop")


def test_only_tokenizers_with_location_tokens_locate():
    assert has_location_tokens(TOKENIZER)
    assert not has_location_tokens(Tokenizer.train(World(seed=0).texts(), vocab_size=320))
