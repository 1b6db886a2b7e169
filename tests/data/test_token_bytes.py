"""`Tokenizer.token_bytes`: the bytes each token stands for (the server's logprobs give them, as OpenAI's do), for
the three kinds of tokenizer files polymodal reads: a byte-level BPE (GPT-2's alphabet), a SentencePiece model with
byte fallback, and a tokenizer.json in Gemma's layout (U+2581 for a space, <0xNN> pieces for bytes). The bytes of a
text's tokens join into its UTF-8, characters split over several tokens included; an added or control token's bytes
are its text. Other layouts: WordPiece's continuation prefix is dropped, an unknown token gives its decoded text,
and no id of the vocabulary makes it raise (a piece outside GPT-2's alphabet, a hole in the vocabulary)."""

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from polymodal.data.locations import add_location_tokens
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import InputError

TEXT = "the red é circle 日本 😀"  # two-, three- and four-byte characters the tokenizers below hold no piece of


def joined(tok: Tokenizer, ids: list[int]) -> bytes:
    return b"".join(tok.token_bytes(i) for i in ids)


def test_a_byte_level_bpe_gives_each_token_s_bytes():
    tok = Tokenizer.train(World(seed=0).texts(), vocab_size=320)
    add_location_tokens(tok)
    ids = tok.encode(TEXT)
    assert joined(tok, ids) == TEXT.encode()
    accent = tok.encode("é")
    assert [tok.token_bytes(i) for i in accent] == [b"\xc3", b"\xa9"]  # each token half a character
    assert tok.decode(accent[:1]) == "\ufffd"  # which its text cannot show
    assert tok.token_bytes(tok.token_id("<loc0012>")) == b"<loc0012>" and tok.token_bytes(tok.eos_id) == b"<eos>"
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.token_bytes(tok.vocab_size)


def test_a_sentencepiece_model_with_byte_fallback(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("\n".join(World(seed=0).texts()[:400]))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2)
    tok = Tokenizer.from_file(tmp_path / "tokenizer.model")
    ids = tok.encode(TEXT)
    assert joined(tok, ids) == b" " + TEXT.encode()  # SentencePiece's dummy prefix is a "\u2581": a space
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    fallback = [i for i in ids if sp.is_byte(i)]
    assert len(fallback) == len("é日本😀".encode())  # the characters it never saw, as bytes
    assert all(tok.token_bytes(i) == bytes([int(sp.id_to_piece(i)[3:5], 16)]) for i in fallback)
    assert tok.token_bytes(tok.token_id("<image>")) == b"<image>"


def test_a_tokenizer_json_in_gemma_s_layout(tmp_path):
    pieces = ["<unk>", *(f"<0x{b:02X}>" for b in range(256)), *"\u2581thercdil", "\u2581r", "\u2581re", "\u2581red"]
    merges = [("\u2581", "r"), ("\u2581r", "e"), ("\u2581re", "d")]
    hf = HFTokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and joined(tok, ids) == TEXT.encode()
    assert tok.token_bytes(pieces.index("\u2581red")) == b" red"
    assert tok.token_bytes(pieces.index("<0xC3>")) == b"\xc3"


def test_wordpiece_drops_its_continuation_prefix(tmp_path):
    hf = HFTokenizer(models.WordPiece({"[UNK]": 0, "red": 1, "##dish": 2, "the": 3}, unk_token="[UNK]"))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path)
    ids = tok.encode("the reddish")
    assert tok.text(ids) == "the reddish" and [tok.token_bytes(i) for i in ids] == [b"the", b"red", b"dish"]


def test_a_sentencepiece_model_without_byte_fallback_gives_its_unknown_token_s_text(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("\n".join(World(seed=0).texts()[:400]))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=200, model_type="bpe", minloglevel=2)
    tok = Tokenizer.from_file(tmp_path / "tokenizer.model")
    ids = tok.encode("red 😀")
    assert tok.decode(ids).endswith("\u2047 ")  # the character it cannot spell reads " ⁇ "
    assert joined(tok, ids) == b" " + tok.decode(ids).encode()  # SentencePiece's dummy prefix: a space


def test_no_id_of_the_vocabulary_raises(tmp_path):
    """A byte-level decoder over pieces outside GPT-2's alphabet ("▁x", a raw newline), and a vocabulary with holes
    (ids 1..4 name no piece): each gives the text the decoder gives it."""
    for name, vocab in (("odd", {"a": 0, "\u0120": 1, "\u2581x": 2, "\n": 3}), ("holes", {"a": 0, "b": 5})):
        hf = HFTokenizer(models.BPE(vocab, []))
        hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        (tmp_path / name).mkdir()
        hf.save(str(tmp_path / name / "tokenizer.json"))
        tok = Tokenizer.from_file(tmp_path / name)
        for i in range(tok.vocab_size):
            assert tok.token_bytes(i) == tok.decode([i], skip_special_tokens=False).encode(), (name, i)
    assert Tokenizer.from_file(tmp_path / "odd").token_bytes(2) == "\u2581x".encode()
