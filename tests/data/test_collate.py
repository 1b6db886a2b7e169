"""Documents -> batches: layouts per family (PaliGemma's against HF's PaliGemmaProcessor), labels only on
targets, and packing that leaves every document's logits and loss exactly as they are alone."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal import build
from polymodal.config import DecoderConfig
from polymodal.data.collate import IGNORE, count_targets
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.data.documents import Document, Segment
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.presets import get_preset

WORLD = World(seed=0)
TOKENIZER = Tokenizer.train(WORLD.texts(), 512)
TEXT = fit_to_tokenizer(DecoderConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64), TOKENIZER)
PALI = fit_to_tokenizer(get_preset("paligemma-tiny"), TOKENIZER)
WORDS = sorted({w for t in WORLD.texts() for w in t.split()})


def text_doc(*parts: str, target: int | None = None) -> Document:
    return Document([Segment("text", p, target=i == target) for i, p in enumerate(parts)])


def test_decoder_layout_puts_labels_on_targets_and_their_end():
    tok = TOKENIZER
    c = make_collator(TEXT, tok)
    q, a = tok.encode("what colour is the shape?"), tok.encode("red")
    sep = tok.encode("\n")
    enc = c.encode(text_doc("what colour is the shape?", "red", target=1))
    assert enc.tokens["input_ids"] == [tok.bos_id, *q, *sep, *a, tok.eos_id]
    assert enc.tokens["labels"] == [IGNORE] * (1 + len(q) + len(sep)) + a + [tok.eos_id]
    # no segment marked: all text is learned (plain pretraining), never the <bos>
    enc = c.encode(text_doc("a red circle", "a blue square"))
    assert enc.tokens["labels"] == [IGNORE] + enc.tokens["input_ids"][1:]
    # a prompt stops before the first target and ends in the separator the answer follows in training
    prompt = c.prompts([text_doc("what colour is the shape?", "red", target=1)])
    assert prompt["input_ids"][0].tolist() == [tok.bos_id, *q, *sep] and "labels" not in prompt


def test_paligemma_layout_matches_hf_processor(tmp_path):
    transformers = pytest.importorskip("transformers", reason="HF PaliGemmaProcessor is the reference layout")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "size": {"height": 32, "width": 32}, "resample": 3,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "image_seq_length": PALI.tokens_per_image}))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=TOKENIZER._model.tok, bos_token="<bos>",
                                                  eos_token="<eos>", pad_token="<pad>")
    processor = transformers.PaliGemmaProcessor(
        image_processor=transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil"), tokenizer=hf_tok)
    examples = [WORLD.sample(task, i) for i, task in enumerate(["colour", "position", "caption", "count"])]
    docs = [e.document for e in examples]
    ref = processor(images=[d.images[0] for d in docs], text=[d.texts[0] for d in docs],
                    suffix=[e.answer for e in examples], return_tensors="pt", padding="longest")
    ours = make_collator(PALI, TOKENIZER)(docs)
    for key in ("input_ids", "token_type_ids", "labels", "attention_mask"):
        assert torch.equal(ours[key], torch.as_tensor(ref[key])), key
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=1e-6, rtol=0)
    # the generation prompt is the prefix HF builds without a suffix
    prompt = make_collator(PALI, TOKENIZER).prompts(docs[:1])
    assert prompt["input_ids"][0].tolist() == ref["input_ids"][0, :prompt["input_ids"].shape[1]].tolist()
    assert prompt["token_type_ids"].eq(0).all()


@pytest.mark.parametrize("segments, message", [
    ([Segment("text", "hi"), Segment("image", media=WORLD.draw("red", "circle"))], "image after text"),
    ([Segment("video", media=[WORLD.draw("red", "circle")] * 2), Segment("text", "x", target=True)], "video"),
    ([Segment("text", "draw"), Segment("image", media=WORLD.draw("red", "circle"), target=True)], "image target"),
    ([Segment("text", "a", target=True), Segment("text", "b")], "prompt text after target"),
])
def test_paligemma_rejects_what_it_cannot_read(segments, message):
    with pytest.raises(ValueError, match=f"document 'doc-7'.*{message}"):
        make_collator(PALI, TOKENIZER)([Document(segments, id="doc-7")])


def test_errors_name_the_document():
    c = make_collator(TEXT, TOKENIZER, max_len=8)
    with pytest.raises(ValueError, match=r"document 1 is \d+ tokens long; the limit is max_len=8"):
        c([text_doc("red"), text_doc(*["where is the blue triangle?"] * 3)])
    with pytest.raises(ValueError, match="document 'x' has image segments; a text-only decoder reads text only"):
        c([Document([Segment("image", media=WORLD.draw("red", "circle")), Segment("text", "red")], id="x")])


docs_strategy = st.lists(
    st.lists(st.tuples(st.lists(st.sampled_from(WORDS), min_size=1, max_size=5), st.booleans()),
             min_size=1, max_size=3),
    min_size=1, max_size=5)


def spans(batch):
    """(row, start, length) of every packed document."""
    out = []
    for r, ids in enumerate(batch["document_ids"]):
        for d in ids.unique().tolist():
            where = (ids == d).nonzero()[:, 0]
            out += [(r, int(where[0]), len(where))] if d else []
    return out


@settings(max_examples=15, deadline=None)
@given(docs_strategy)
def test_packed_documents_give_exactly_their_alone_logits_and_loss(raw):
    torch.manual_seed(0)
    model = build(TEXT).eval()
    docs = [Document([Segment("text", " ".join(words), target=t) for words, t in segs]) for segs in raw]
    c = make_collator(TEXT, TOKENIZER, max_len=40)
    encoded = [c.encode(d) for d in docs]
    packed, padded = c.pack(encoded, 40), c.pad(encoded)
    assert count_targets(packed) == count_targets(padded)
    placed = spans(packed)
    assert sorted(packed["input_ids"][r, s:s + n].tolist() for r, s, n in placed) == \
        sorted(e.tokens["input_ids"] for e in encoded)
    with torch.no_grad():
        out = model(**packed)
        torch.testing.assert_close(out.loss, model(**padded).loss, atol=1e-5, rtol=1e-5)
        for r, s, n in placed:
            alone = model(packed["input_ids"][r, s:s + n][None]).logits[0]
            torch.testing.assert_close(out.logits[r, s:s + n], alone, atol=1e-5, rtol=1e-5)


def test_packed_image_documents_give_exactly_their_alone_logits():
    torch.manual_seed(0)
    model = build(PALI).eval()
    c = make_collator(PALI, TOKENIZER)
    encoded = [c.encode(WORLD.sample(task, 3).document) for task in ("caption", "count", "position", "colour")]
    packed = c.pack(encoded, 64)  # rows of two documents, each with its own image and prefix block
    assert packed["input_ids"].shape[0] == 2
    with torch.no_grad():
        out = model(**packed)
        torch.testing.assert_close(out.loss, model(**c.pad(encoded)).loss, atol=1e-5, rtol=1e-5)
        for (r, s, n), e in zip(sorted(spans(packed)), encoded):
            alone = model(**c.pad([e])).logits[0]
            torch.testing.assert_close(out.logits[r, s:s + n], alone, atol=1e-5, rtol=1e-5)


def test_packing_fills_rows_first_fit_and_keeps_media_in_token_order():
    c = make_collator(PALI, TOKENIZER, max_len=60)
    docs = [WORLD.sample("colour", i).document for i in range(5)]
    encoded = [c.encode(d) for d in docs]
    batch = c.pack(encoded, 60)  # each document is ~26 tokens: two to a row
    assert batch["input_ids"].shape == (3, 60)
    assert batch["document_ids"][:, 0].tolist() == [1, 1, 1]
    torch.testing.assert_close(batch["pixel_values"], torch.cat([e.media["pixel_values"] for e in encoded]))
    with pytest.raises(ValueError, match="longer than a packed row"):
        c.pack(encoded, 20)
