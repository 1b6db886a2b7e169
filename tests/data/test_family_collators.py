"""The batches of the families that do not put media in the token stream: Flamingo (images per row,
`families/flamingo/format.py`) and the dual encoders (image-caption pairs, `families/contrastive/format.py`)."""

import pytest
import torch

import polymodal as pm
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.data.documents import Document, Segment
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import DocumentError

WORLD = World(seed=0)
TOK = Tokenizer.train(WORLD.texts(), vocab_size=400)


def setup(preset):
    config = fit_to_tokenizer(pm.PRESETS[preset](), TOK)
    return config, make_collator(config, TOK)


def test_flamingo_rows_hold_their_images_and_packed_equals_padded():
    config, collate = setup("flamingo-tiny")
    red, blue = WORLD.draw("red", "circle"), WORLD.draw("blue", "square")
    two = Document([Segment("image", media=red), Segment("text", "and"), Segment("image", media=blue),
                    Segment("text", "a blue square", target=True)])
    docs = [two, WORLD.sample("colour", 0).document, Document([Segment("text", "no image", target=True)])]
    padded = collate(docs)
    assert padded["pixel_values"].shape == (3, 2, 3, 32, 32)
    assert padded["media_mask"].tolist() == [[True, True], [True, False], [False, False]]
    assert (padded["input_ids"] == config.media_token_id).sum(1).tolist() == [2, 1, 0]  # one token per image
    packed = collate(docs, pack=True)
    assert packed["pixel_values"].shape[:2] == (1, 3) and packed["media_mask"].all()
    torch.manual_seed(0)
    model = pm.build(config).eval()
    with torch.no_grad():  # each packed document sees only its own images
        torch.testing.assert_close(model(**packed).loss, model(**padded).loss)
    video = Document([Segment("video", media=[red, blue]), Segment("text", "left", target=True)])
    with pytest.raises(DocumentError, match="video segments; this Flamingo reads images and text"):
        collate([video])


@pytest.mark.parametrize("preset", ["clip-tiny", "siglip-tiny"])
def test_pairs_are_laid_out_as_each_reference_pools_them(preset):
    config, collate = setup(preset)
    doc = WORLD.sample("caption", 0)
    short = Document([Segment("image", media=WORLD.draw("red", "circle")), Segment("text", "a red circle")])
    batch = collate([doc.document, short])
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}  # no labels: the loss is contrastive
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    caption = TOK.encode(doc.answer) + [TOK.eos_id]  # the target text only, not the prompt "caption"
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    if preset == "clip-tiny":  # <bos> text <eos>, pooled at <eos>
        assert ids == [TOK.bos_id, *caption]
    else:  # text <eos>, padded to the tower's length: pooled at the last position
        assert ids == caption and batch["input_ids"].shape[1] == config.text.max_seq_len
    assert pm.build(config)(**batch).loss.isfinite()
    with pytest.raises(DocumentError, match="2 images and 1 texts; a dual encoder reads exactly one image"):
        collate([Document([Segment("image", media=WORLD.draw("red", "circle"))] * 2 + [Segment("text", "x")])])
    with pytest.raises(pm.ConfigError, match="--pack does not apply"):
        collate([short], pack=True)
