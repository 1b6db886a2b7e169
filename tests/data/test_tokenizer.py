"""Tokenizer: trained byte-level BPE round trips, control tokens, tokenizer.json and SentencePiece files."""

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import models, pre_tokenizers

from polymodal.data.tokenizer import Tokenizer

CORPUS = [
    f"the {c} {s} number {i} sits {p} the box. Héllo wörld, 日本語 {i * 7}!"
    for i, (c, s, p) in enumerate(
        (c, s, p)
        for c in ("red", "green", "blue", "yellow")
        for s in ("circle", "square", "triangle", "star", "cross")
        for p in ("left of", "right of", "above", "below", "inside", "outside")
        for _ in range(25)
    )
]
TEXTS = [
    "",
    "a",
    "the red circle is left of the blue square",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\r\n",
    "naïve café, Zürich, São Paulo, Ελληνικά, русский, العربية",
    "日本語のテキスト 中文 한국어",
    "emoji 🤖🎉👩‍👩‍👧 and symbols ∑∫√ ≠ ≤",
    "\x00 control \x7f chars",
]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=400)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(trained, text):
    assert trained.decode(trained.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(trained, text):
    assert trained.decode(trained.encode(text), skip_special_tokens=False) == text


def test_trained_layout(trained):
    assert 300 < trained.vocab_size <= 400
    assert list(trained.special_ids.values()) == list(range(len(Tokenizer.SPECIAL_TOKENS)))
    assert (trained.pad_id, trained.bos_id, trained.eos_id) == (0, 1, 2)
    assert len(trained.encode("the red circle")) < len("the red circle")  # merges were learned


def test_special_tokens_are_never_split(trained):
    for name in Tokenizer.SPECIAL_TOKENS:
        assert trained.encode(name) == [trained.token_id(name)]
        ids = trained.encode(f"look{name}here")
        assert ids.count(trained.token_id(name)) == 1
    image, end = trained.token_id("<image>"), trained.token_id("</image>")
    ids = trained.encode("caption: <image></image> a red star")
    assert ids[ids.index(image) + 1] == end
    assert trained.decode(ids) == "caption:  a red star"
    assert trained.decode(ids, skip_special_tokens=False) == "caption: <image></image> a red star"
    ids = trained.encode("hi", add_bos=True, add_eos=True)
    assert ids[0] == trained.bos_id and ids[-1] == trained.eos_id and trained.decode(ids) == "hi"
    assert trained.encode_batch(TEXTS, add_eos=True) == [trained.encode(t, add_eos=True) for t in TEXTS]


def test_save_load_round_trip(trained, tmp_path):
    trained.save(tmp_path)
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.vocab_size == trained.vocab_size and loaded.special_ids == trained.special_ids
    texts = [*TEXTS, "<bos>a <image> b</image><eos>"]
    assert loaded.encode_batch(texts) == trained.encode_batch(texts)
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").encode_batch(texts) == trained.encode_batch(texts)


def _gemma_like_bpe() -> tokenizers.Tokenizer:
    """A BPE whose vocabulary has Gemma's <pad>/<eos>/<bos> at 0/1/2 and an <image> entry, plus Llama's </s>."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def test_tokenizer_json_reuses_checkpoint_tokens(tmp_path):
    ref = _gemma_like_bpe()
    ref.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    n = ref.get_vocab_size()
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.token_id("<image>")) == (0, 1, 2, 4)
    assert sorted(tok.special_ids[t] for t in ("<sep>", "</image>", "<img>", "</img>", "<audio>", "</audio>",
                                               "<video>", "</video>")) == list(range(n, n + 8))
    assert tok.vocab_size == n + 8
    for text in TEXTS + CORPUS[:50]:
        assert tok.encode(text) == ref.encode(text).ids
    assert tok.encode("a<image>b<video>") == [ref.token_to_id("a"), 4, ref.token_to_id("b"), tok.token_id("<video>")]


def test_tokenizer_json_aliases(tmp_path):
    tok = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ours = Tokenizer(tok)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 4)
    assert ours.token_id("<bos>") == ours.token_id("<s>") == 1
    assert ours.encode("<s>hello</s>") == [1, 3, 2]
    assert tok.get_vocab_size(with_added_tokens=True) == 4  # the caller's object is left alone


def test_matches_transformers_fast_tokenizer(trained, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference for tokenizer parity")
    trained.save(tmp_path)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    texts = [*TEXTS, "<bos>a red star<image></image> in the box<eos>", "<audio><video></video></audio>"]
    for text in texts:
        ids = trained.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert trained.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(CORPUS[::4]))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, minloglevel=2,
    )
    return d / "tokenizer.model", spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


def test_sentencepiece_file(sp_model, tmp_path):
    path, sp = sp_model
    tok = Tokenizer.from_file(path)
    n = sp.get_piece_size()
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id()) == (1, 2)  # <s>, </s> reused
    assert tok.pad_id == n and tok.vocab_size == n + 10
    for text in TEXTS + CORPUS[:50]:
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    ids = tok.encode("the red<image>star", add_bos=True)
    assert ids == [1, *sp.encode("the red"), tok.token_id("<image>"), *sp.encode("star")]
    assert tok.decode(ids) == "the redstar"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>the red<image>star"

    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["polymodal_tokenizer.json", "tokenizer.model"]
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.special_ids == tok.special_ids and loaded.vocab_size == tok.vocab_size
    texts = [*TEXTS, "<pad><sep>the <audio>blue</audio> box"]
    assert loaded.encode_batch(texts) == tok.encode_batch(texts)


def test_directory_prefers_tokenizer_json(trained, sp_model, tmp_path):
    path, _ = sp_model
    trained.save(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(path.read_bytes())
    assert Tokenizer.from_file(tmp_path).vocab_size == trained.vocab_size


def test_errors(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json, tokenizer.model"):
        Tokenizer.from_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="vocab.txt"):
        Tokenizer.from_file(tmp_path / "vocab.txt")
    with pytest.raises(KeyError, match="'<mask>' is not in the vocabulary"):
        trained.token_id("<mask>")
    with pytest.raises(ValueError, match="at least 268"):
        Tokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trained.decode([trained.vocab_size])
    with pytest.raises(TypeError, match="list of strings"):
        trained.encode_batch("abc")
    with pytest.raises(TypeError, match="SentencePieceProcessor"):
        Tokenizer({"a": 1})


def test_text_of_generated_ids_leaves_out_ids_past_the_tokenizer(trained):
    """A model writes ids the tokenizer has no text for (image codes, a vocabulary padded past it): `text` leaves
    them out, and control tokens, wherever they fall; `decode` refuses them."""
    ids = trained.encode("a red circle")
    past = [trained.vocab_size, trained.vocab_size + 7]
    written = [past[0], *ids[:2], trained.eos_id, past[1], *ids[2:]]
    assert trained.text(written) == trained.decode(ids) == "a red circle"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trained.decode(written)
