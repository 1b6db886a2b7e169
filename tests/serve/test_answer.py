"""A response's choice token by token (`serve.answer.Answer`) with a real tokenizer and a real drawing model
(chameleon-tiny, random weights): text and a drawn image come out in their order, the image as the PNG of
`images_from_codes`; stop strings end the text before them and a partial match is held back, not sent."""

import base64
import io

import numpy as np
import torch
from PIL import Image

import polymodal as pm
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.generation.batching import Request
from polymodal.families.chameleon.format import ChameleonFormat
from polymodal.families.chameleon.presets import chameleon_tiny
from polymodal.serve.answer import Answer

TOKENIZER = Tokenizer.train(World(seed=0).texts(), vocab_size=320)


def feed(answer, tokens: list[int], reason: str = "length") -> tuple[list, list, int]:
    """The events, each token's keep-going answer, and how many events came before the end."""
    events = []
    answer.push = events.extend
    kept = []
    for t in tokens:  # as the batcher does: no token after a False
        kept.append(answer.on_token(t))
        if not kept[-1]:
            break
    streamed = len(events)
    answer.on_finish(Request({"input_ids": torch.tensor([[1]])}, max_new_tokens=1, finish_reason=reason))
    return events, kept, streamed


def test_text_then_a_drawn_image_then_text_in_order():
    model = pm.build(ChameleonFormat.fit(chameleon_tiny(), TOKENIZER)).eval()
    spans = model.image_spans
    codes = torch.randint(0, len(spans.codes), (spans.length,))
    before, after = TOKENIZER.encode("a red"), TOKENIZER.encode(" circle")
    tokens = before + [spans.begin, *spans.codes[codes].tolist(), spans.end] + after
    events, _, _ = feed(Answer(TOKENIZER, (), model, None), tokens)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "text" and kinds[-1] == "done" and kinds.count("image") == 1
    image_at = kinds.index("image")
    assert "".join(v for k, v in events[:image_at] if k == "text") == "a red"
    assert "".join(v for k, v in events[image_at:] if k == "text") == " circle"
    drawn = Image.open(io.BytesIO(base64.b64decode(events[image_at][1])))
    [[expected]] = model.images_from_codes([[codes]])
    assert np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(expected))


def test_stop_strings_end_the_text_and_a_partial_match_is_held_back():
    tokens = [t for word in ("red", " circle", " and", " blue") for t in TOKENIZER.encode(word)]
    events, kept, _ = feed(Answer(TOKENIZER, ("circle and",), None, None), tokens, reason="stop")
    assert "".join(v for k, v in events if k == "text") == "red "
    assert events[-1] == ("done", "stop") and kept[-1] is False
    assert len(kept) == len(tokens) - len(TOKENIZER.encode(" blue"))  # " and" ended it
    # "circ" could begin the stop string: not sent until it cannot
    events, kept, streamed = feed(Answer(TOKENIZER, ("circle and",), None, None), TOKENIZER.encode("red circ"))
    assert "".join(v for k, v in events[:streamed] if k == "text") == "red " and all(kept)
    assert "".join(v for k, v in events if k == "text") == "red circ"  # the answer ended: nothing is held
    assert events[-1] == ("done", "length")


def test_a_whole_answer_is_decoded_once_at_its_end_with_its_first_token_told():
    """Read only at its end (not streamed, no stop strings), a text answer sends one empty event at its first token
    (the time-to-first-token metric) and its text once, at the end: the same text as token by token."""
    tokens = TOKENIZER.encode("a red circle above a blue square")
    by_token, _, _ = feed(Answer(TOKENIZER, (), None, print), tokens)
    whole, kept, streamed = feed(Answer(TOKENIZER, (), None, print, whole=True), tokens)
    assert all(kept) and streamed == 1 and whole[0] == ("text", "")
    assert whole[1:] == [("text", TOKENIZER.text(tokens)), ("done", "length")]
    assert "".join(v for what, v in by_token if what == "text") == TOKENIZER.text(tokens)
    stopped, _, _ = feed(Answer(TOKENIZER, ("blue",), None, print, whole=True), tokens)  # a stop string: watched
    assert "".join(v for what, v in stopped if what == "text") == TOKENIZER.text(tokens).split("blue")[0]
