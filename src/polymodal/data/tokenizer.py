"""A multimodal tokenizer over HF `tokenizers` or SentencePiece that never touches the network.

Every tokenizer carries the control tokens in `Tokenizer.SPECIAL_TOKENS`. A checkpoint's own
token for the same role is reused (Gemma/PaliGemma `<bos>`, `<image>`; Llama's `<s>`, `</s>`),
missing ones are appended after the vocabulary, and all of them are matched whole in text.
`add_tokens` registers pieces that are matched whole too but kept by decode, as HF's `add_tokens` does
(PaliGemma's `<locNNNN>` and `<segNNN>`: an answer's text keeps them).
`Tokenizer.train` builds a byte-level BPE (GPT-2 style): every string maps to bytes and back,
so decode(encode(text)) == text for any text, with no unknown token.
`encode(text, split_special_tokens=True)` (HF's name) reads control-token text such as "<eos>" as
plain text: documents' text is encoded so, and can never inject a control token.
"""

import itertools
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from polymodal.errors import (CheckpointError, InputError, InputTypeError, MissingFileError, UnknownNameError,
                              check_text)

# Other spellings of a role found in checkpoints, tried after the canonical name.
_ALIASES = {
    "<bos>": ("<s>", "<|begin_of_text|>", "<|startoftext|>"),
    "<eos>": ("</s>", "<|end_of_text|>", "<|endoftext|>"),
    "<pad>": ("<|pad|>", "[PAD]"),
}
_SP_FILES = ("tokenizer.model", "spiece.model")
_SP_ADDED_FILE = "polymodal_tokenizer.json"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback piece (SentencePiece, Gemma and Llama 2 files)


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte: printable Latin-1 bytes stand for themselves, the other 68
    bytes for the chars from U+0100 on, in byte order (what `tokenizers`' ByteLevel decoder undoes)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_LEVEL = _byte_level_chars()


def _piece_bytes(piece: str, byte_fallback: bool) -> bytes:
    """A SentencePiece-style piece's bytes: <0xNN> the byte NN where the tokenizer has byte fallback, U+2581 ("▁")
    a space."""
    byte = _BYTE_PIECE.fullmatch(piece) if byte_fallback else None
    return bytes([int(byte[1], 16)]) if byte else piece.replace("\u2581", " ").encode()


def _decoder_steps(tok: tokenizers.Tokenizer) -> list[dict]:
    """The file's decoders as their JSON: the one, or those of a Sequence, in order."""
    if tok.decoder is None:
        return []
    decoder = json.loads(tok.decoder.__getstate__())
    return decoder.get("decoders", [decoder])


class _HFModel:
    """A `tokenizers.Tokenizer`; it matches added tokens in text itself."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        self._literal: tokenizers.Tokenizer | None = None  # a copy that reads special tokens as text
        self._added: set[int] | None = None  # the added tokens' ids, read on use
        # what its decoder makes of a piece, for token_bytes: pieces that spell bytes in GPT-2's alphabet, <0xNN>
        # pieces read as bytes, WordPiece's continuation prefix ("##") dropped
        steps = _decoder_steps(tok)
        self._byte_level = any(step["type"] == "ByteLevel" for step in steps)
        self._byte_fallback = any(step["type"] == "ByteFallback" for step in steps)
        self._continuation = next((step["prefix"] for step in steps if step["type"] == "WordPiece"), None)

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def lookup(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def add_special(self, piece: str) -> int:
        self.tok.add_special_tokens([AddedToken(piece, special=True, normalized=False)])
        self._literal = self._added = None
        return self.tok.token_to_id(piece)

    def add_plain(self, pieces: Sequence[str]) -> list[int]:
        # one call for all: tokenizers rebuilds its matcher of added tokens on each call
        self.tok.add_tokens([AddedToken(piece, special=False, normalized=False) for piece in pieces])
        self._literal = self._added = None
        return [self.tok.token_to_id(piece) for piece in pieces]

    def token_bytes(self, i: int) -> bytes:
        if self._added is None:
            self._added = set(self.tok.get_added_tokens_decoder())
        piece = self.tok.id_to_token(i)
        if i in self._added:  # matched whole in text: its own characters
            return piece.encode()
        if piece is None or (self._byte_level and not set(piece) <= _BYTE_LEVEL.keys()):
            # a hole in the vocabulary, or a piece outside GPT-2's alphabet: the text its decoder gives it
            return self.tok.decode([i], skip_special_tokens=False).encode()
        if self._byte_level:
            return bytes(_BYTE_LEVEL[c] for c in piece)
        if self._continuation and piece.startswith(self._continuation):
            piece = piece[len(self._continuation):]
        return _piece_bytes(piece, self._byte_fallback)

    def encode_batch(self, texts: list[str], split_special_tokens: bool = False) -> list[list[int]]:
        tok = self.tok
        if split_special_tokens:
            if self._literal is None:  # a copy, not a flag flipped on the shared one: safe across threads
                self._literal = tokenizers.Tokenizer.from_str(self.tok.to_str())
                self._literal.encode_special_tokens = True
            tok = self._literal
        # add_special_tokens=False: BOS/EOS come from Tokenizer.encode, not the file's post-processor.
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, directory: Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))


def _register_saved(model: "_HFModel | _SPModel", added: Sequence[str], plain: Sequence[str]) -> None:
    """Added tokens in saved order, so appended ids come back unchanged: runs of plain ones at once, then the
    rest of `plain`."""
    plain_set = set(plain)
    for is_plain, run in itertools.groupby(added, key=plain_set.__contains__):
        if is_plain:
            model.add_plain(list(run))
        else:
            for piece in run:
                model.add_special(piece)
    model.add_plain(list(plain))


class _SPModel:
    """A SentencePiece model; its proto cannot grow, so added tokens live here, after its pieces."""

    def __init__(self, sp: Any, added: Sequence[str] = (), plain: Sequence[str] = ()):
        self.sp = sp
        self.added: dict[str, int] = {}
        self.specials: dict[str, int] = {}
        self.plain: dict[str, int] = {}  # matched whole like specials, kept by decode
        self._patterns: dict[bool, re.Pattern[str] | None] | None = None  # by split_special_tokens; built on use
        _register_saved(self, added, plain)

    def __len__(self) -> int:
        return self.sp.get_piece_size() + len(self.added)

    def lookup(self, piece: str) -> int | None:
        if piece in self.added:
            return self.added[piece]
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None  # unknown pieces map to <unk>

    def add_special(self, piece: str) -> int:
        return self._register(piece, self.specials)

    def add_plain(self, pieces: Sequence[str]) -> list[int]:
        return [self._register(piece, self.plain) for piece in pieces]

    def _register(self, piece: str, kind: dict[str, int]) -> int:
        i = self.lookup(piece)
        if i is None:
            i = self.added[piece] = len(self)
        kind[piece] = i
        self._patterns = None  # rebuilt once at the next encode, not once per token of a batch added
        return i

    def _pattern(self, split_special_tokens: bool) -> re.Pattern[str] | None:
        if self._patterns is None:
            self._patterns = {}
            for split, pieces in ((False, {**self.specials, **self.plain}), (True, self.plain)):
                alternatives = sorted(pieces, key=len, reverse=True)  # longest first: a token holding another wins
                self._patterns[split] = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") \
                    if pieces else None
        return self._patterns[split_special_tokens]

    def encode_batch(self, texts: list[str], split_special_tokens: bool = False) -> list[list[int]]:
        # split_special_tokens: only the plain tokens are matched (SentencePiece never reads control pieces)
        return [self._encode(text, self._pattern(split_special_tokens)) for text in texts]

    def _encode(self, text: str, pattern: re.Pattern[str] | None) -> list[int]:
        parts = pattern.split(text) if pattern else [text]
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:  # re.split puts the matched separators at odd positions
                ids.append(self.specials.get(part, self.plain.get(part)))
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def token_bytes(self, i: int) -> bytes:
        if i >= self.sp.get_piece_size():  # added here, matched whole in text
            return next(piece for piece, j in self.added.items() if j == i).encode()
        if self.sp.is_unknown(i):  # its text, " ⁇ ", not its piece
            return self.sp.decode([i]).encode()
        return _piece_bytes(self.sp.id_to_piece(i), self.sp.is_byte(i))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        names = {i: piece for piece, i in self.specials.items()}
        plain = {i: piece for piece, i in self.plain.items()}
        out, run = [], []
        for i in ids:
            if i in names or i in plain:
                out.append(self.sp.decode(run))
                run = []
                if i in plain or not skip_special_tokens:
                    out.append(plain.get(i, names.get(i)))
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())
        saved = {"added_tokens": list(self.added), "plain_tokens": list(self.plain)}
        (directory / _SP_ADDED_FILE).write_text(json.dumps(saved, indent=2))


class Tokenizer:
    """Text <-> ids with never-split multimodal control tokens. Build with `train` or `from_file`."""

    SPECIAL_TOKENS = (
        "<pad>", "<bos>", "<eos>", "<sep>",
        "<image>", "</image>", "<img>", "</img>", "<audio>", "</audio>", "<video>", "</video>",
    )

    def __init__(self, model: "tokenizers.Tokenizer | Any", added_tokens: Sequence[str] = (),
                 plain_tokens: Sequence[str] = ()):
        """Wrap a `tokenizers.Tokenizer` (copied, not changed) or a `SentencePieceProcessor`.

        `added_tokens` are registered first, in order, so that saved ids load back unchanged; those also in
        `plain_tokens` (and the rest of `plain_tokens`) as `add_tokens` registers them.
        """
        if isinstance(model, tokenizers.Tokenizer):
            self._model: _HFModel | _SPModel = _HFModel(tokenizers.Tokenizer.from_str(model.to_str()))
            _register_saved(self._model, added_tokens, plain_tokens)
        elif hasattr(model, "serialized_model_proto"):
            self._model = _SPModel(model, added_tokens, plain_tokens)
        else:
            raise InputTypeError(f"expected a tokenizers.Tokenizer or a SentencePieceProcessor, got {type(model).__name__}")
        self._special: dict[str, int] = {}
        for name in self.SPECIAL_TOKENS:
            spellings = (name, *_ALIASES.get(name, ()))
            piece = next((p for p in spellings if self._model.lookup(p) is not None), name)
            self._special[name] = self._model.add_special(piece)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 1) -> "Tokenizer":
        """A byte-level BPE with the control tokens at ids 0..11, the 256 bytes, then merges."""
        base = len(cls.SPECIAL_TOKENS) + 256
        if vocab_size < base:
            raise InputError(f"vocab_size must be at least {base} (control tokens + 256 bytes), got {vocab_size}")
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(cls.SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json`, a SentencePiece `.model`, or a directory holding one (tokenizer.json first)."""
        path = Path(path)
        if path.is_dir():
            candidates = [path / name for name in ("tokenizer.json", *_SP_FILES)]
            file = next((c for c in candidates if c.is_file()), None)
            if file is None:
                raise MissingFileError(f"no tokenizer in {path}: looked for {', '.join(c.name for c in candidates)}")
        elif path.is_file():
            file = path
        else:
            raise MissingFileError(f"tokenizer file {path} does not exist (expected tokenizer.json or a .model file)")
        if file.suffix == ".json":
            try:
                return cls(tokenizers.Tokenizer.from_file(str(file)))
            except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
                raise CheckpointError(f"{file} is not a readable tokenizer.json ({e})") from e
        if file.suffix != ".model":
            raise InputError(f"{file}: expected a tokenizer.json or a SentencePiece .model file")
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(f"{file} is a SentencePiece model: pip install sentencepiece") from e
        added_file = file.parent / _SP_ADDED_FILE
        saved = json.loads(added_file.read_text()) if added_file.is_file() else {}
        try:
            model = sentencepiece.SentencePieceProcessor(model_file=str(file))
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{file} is not a readable SentencePiece model ({e})") from e
        return cls(model, saved.get("added_tokens", []), saved.get("plain_tokens", []))

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._model.save(directory)

    def add_tokens(self, pieces: Sequence[str]) -> list[int]:
        """Register pieces read whole in text and kept by `decode`, as HF's `add_tokens`: content, not control,
        so `split_special_tokens` reads them too. A piece already in the vocabulary keeps its id, a new one
        is appended. Returns their ids."""
        if isinstance(pieces, str):
            raise InputTypeError("add_tokens takes a list of strings, got one string")
        for i, piece in enumerate(pieces):
            if not check_text(piece, f"pieces[{i}]"):
                raise InputError(f"pieces[{i}] is empty: a token needs at least one character")
        return self._model.add_plain(list(pieces))

    @property
    def vocab_size(self) -> int:
        return len(self._model)

    @property
    def pad_id(self) -> int:
        return self._special["<pad>"]

    @property
    def bos_id(self) -> int:
        return self._special["<bos>"]

    @property
    def eos_id(self) -> int:
        return self._special["<eos>"]

    @property
    def special_ids(self) -> dict[str, int]:
        """Each name in SPECIAL_TOKENS -> its id."""
        return dict(self._special)

    def token_id(self, token: str) -> int:
        """The id of a control token (by its name in SPECIAL_TOKENS) or of any vocabulary piece."""
        i = self._special.get(token)
        if i is None:
            i = self._model.lookup(token)
        if i is None:
            raise UnknownNameError(f"token {token!r} is not in the vocabulary ({self.vocab_size} tokens)")
        return i

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False,
               split_special_tokens: bool = False) -> list[int]:
        """split_special_tokens: read control-token text ("<eos>") as plain text, never as the token."""
        return self.encode_batch([text], add_bos, add_eos, split_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False,
                     split_special_tokens: bool = False) -> list[list[int]]:
        if isinstance(texts, str):
            raise InputTypeError("encode_batch takes a list of strings; use encode for one string")
        for i, text in enumerate(texts):
            check_text(text, f"texts[{i}]")
        head, tail = [self.bos_id] * add_bos, [self.eos_id] * add_eos
        return [head + ids + tail for ids in self._model.encode_batch(list(texts), split_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids, vocab = [int(i) for i in ids], self.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InputError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return self._model.decode(ids, skip_special_tokens)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for, as OpenAI's logprobs give them: a byte-level piece's bytes, a
        byte-fallback piece <0xNN> the byte NN, U+2581 ("▁") a space, WordPiece's "##dish" "dish", an unknown
        token or a piece outside GPT-2's alphabet the text its decoder gives it, an added or control token its text.
        For a byte-level BPE and a byte-fallback layout (SentencePiece, Gemma's, Llama 2's) the bytes of an answer's
        tokens join into its UTF-8, a character split over several tokens included (but the leading space a
        decoder may strip); for other layouts (WordPiece's spaces between words, a file without a decoder) not
        always. Never raises for an id in the vocabulary."""
        if not 0 <= int(token) < self.vocab_size:
            raise InputError(f"id {token} is outside the vocabulary [0, {self.vocab_size})")
        return self._model.token_bytes(int(token))

    def text(self, ids: Iterable[int]) -> str:
        """The text of generated ids: ids past the tokenizer's vocabulary (image codes, a model vocabulary
        padded past the tokenizer's) have none and are left out, as are control tokens."""
        vocab = self.vocab_size
        return self.decode([i for i in map(int, ids) if i < vocab])
