"""The 1,024 location and 128 segmentation tokens: at HF PaliGemma's ids, and in polymodal's Tokenizer read
whole, kept by decode (the text of an answer keeps its boxes) and saved with it, on both backends."""

import re

import pytest

from polymodal.data.locations import (LOC_TOKENS, SEG_TOKENS, add_location_tokens, format_object,
                                      paligemma_location_ids)
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.paligemma.config import PaliGemmaConfig

GEMMA_NORMALISER = dict(normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False)
CORPUS = [f"the {c} {s} is {p} the box" for c in ("red", "green", "blue") for s in ("circle", "square")
          for p in ("left of", "above", "inside")] * 10


def test_ids_follow_gemma_s_vocabulary_up_to_the_image_token():
    """HF's PaliGemma tokenizer: Gemma's 256,000 pieces, then <loc0000>..<loc1023>, <seg000>..<seg127>,
    then the <image> token, whose id checkpoints' configs carry (image_token_index 257152)."""
    ids = paligemma_location_ids()
    assert list(ids) == [*LOC_TOKENS, *SEG_TOKENS]
    assert ids["<loc0000>"] == 256000 and ids["<seg000>"] == ids["<loc1023>"] + 1
    assert sorted(ids.values()) == list(range(256000, 256000 + 1152))
    assert max(ids.values()) + 1 == PaliGemmaConfig.__dataclass_fields__["image_token_id"].default


def check_round_trip(tok: Tokenizer, ids: dict[str, int]) -> None:
    answer = format_object((3, 4, 50, 60), (64, 64), "red circle", list(range(16))) + " ; " + \
        format_object((0, 0, 64, 64), (64, 64), "box")
    for split in (False, True):  # documents' text too: these are content, not control tokens
        encoded = tok.encode(answer, split_special_tokens=split)
        assert [i for i in encoded if i in set(ids.values())] == [ids[t] for t in _tokens(answer)]
        assert tok.decode(encoded) == answer  # kept with skip_special_tokens=True, the default
    assert tok.encode("<eos>", split_special_tokens=True) != [tok.eos_id]  # control tokens stay literal there


def _tokens(text: str) -> list[str]:
    return re.findall(r"<(?:loc\d{4}|seg\d{3})>", text)


def test_a_trained_tokenizer_appends_them_and_saves_them(tmp_path):
    tok = Tokenizer.train(CORPUS, vocab_size=300)
    before = tok.vocab_size
    ids = add_location_tokens(tok)
    assert list(ids.values()) == list(range(before, before + 1152)) and tok.vocab_size == before + 1152
    check_round_trip(tok, ids)
    assert add_location_tokens(tok) == ids and tok.vocab_size == before + 1152  # a second call adds nothing
    tok.save(tmp_path)
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.vocab_size == tok.vocab_size
    check_round_trip(loaded, ids)


@pytest.fixture(scope="module")
def sp_with_locations(tmp_path_factory):
    """A SentencePiece model holding the tokens as pieces, as PaliGemma's does (there at 256000..), and
    normalising as Gemma's does (none: spaces kept as written)."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=1152 + 320, model_type="bpe",
        user_defined_symbols=[*LOC_TOKENS, *SEG_TOKENS], hard_vocab_limit=False, byte_fallback=True, minloglevel=2, **GEMMA_NORMALISER)
    return d / "tokenizer.model"


def test_a_sentencepiece_model_keeps_its_ids_and_saves_them(sp_with_locations, tmp_path):
    tok = Tokenizer.from_file(sp_with_locations)
    own = {t: tok.token_id(t) for t in (*LOC_TOKENS, *SEG_TOKENS)}
    before = tok.vocab_size
    assert add_location_tokens(tok) == own and tok.vocab_size == before  # present: nothing appended
    check_round_trip(tok, own)
    tok.save(tmp_path)
    check_round_trip(Tokenizer.from_file(tmp_path), own)


def test_a_sentencepiece_model_without_them_appends_them(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=320, model_type="bpe", hard_vocab_limit=False, byte_fallback=True,
                                   minloglevel=2, **GEMMA_NORMALISER)
    tok = Tokenizer.from_file(tmp_path / "plain.model")
    before = tok.vocab_size
    ids = add_location_tokens(tok)
    assert list(ids.values()) == list(range(before, before + 1152))
    check_round_trip(tok, ids)
    tok.save(tmp_path / "saved")
    loaded = Tokenizer.from_file(tmp_path / "saved")
    assert loaded.special_ids == tok.special_ids and loaded.vocab_size == tok.vocab_size
    check_round_trip(loaded, ids)


def test_bad_pieces_are_clear_errors():
    tok = Tokenizer.train(CORPUS, vocab_size=300)
    with pytest.raises(TypeError, match="list of strings"):
        tok.add_tokens("<loc0000>")
    with pytest.raises(ValueError, match="empty"):
        tok.add_tokens([""])
