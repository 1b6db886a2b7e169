"""Documents for a model config, through its family's spec: the format that lays a document out, the collator
that batches it (`data.collate.Collator` unless the family names its own), and the config fitted to a tokenizer."""

from __future__ import annotations

from polymodal.data.collate import Collator
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import ConfigError, DocumentError
from polymodal.families import spec_of


def document_format(config, tokenizer: Tokenizer):
    """The format (an instance) that lays documents out for the model built from `config`."""
    spec = spec_of(config)
    if spec.format is None:
        raise DocumentError(f"a {type(config).__name__} model reads no documents: it is an encoder of one modality; "
                            "train or evaluate the family that holds it")
    return spec.format(config, tokenizer)


def make_collator(config, tokenizer: Tokenizer, max_len: int | None = None):
    """The collator for the model built from `config`; max_len as in `Collator`."""
    return (spec_of(config).collator or Collator)(document_format(config, tokenizer), max_len)


def fit_to_tokenizer(config, tokenizer: Tokenizer):
    """The model config with its vocabulary size and special token ids taken from the tokenizer."""
    spec = spec_of(config)
    if spec.format is None:
        raise DocumentError(f"a {type(config).__name__} model reads no tokens, so no tokenizer fits it")
    return spec.format.fit(config, tokenizer)


def check_tokenizer(config, tokenizer: Tokenizer, where: str) -> None:
    """ConfigError unless the tokenizer fits the model built from `config`: every id it gives has an embedding
    row, and a generative model's bos / eos / pad ids are the tokenizer's (a tokenizer of another run of the
    same size would otherwise load and write garbage)."""
    text = getattr(config, "text", config)
    rows = getattr(text, "vocab_size", None)
    if rows is not None and tokenizer.vocab_size > rows:
        raise ConfigError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, the model's embeddings "
                          f"{rows} rows: ids from {rows} on would index nothing; the tokenizer belongs to another model")
    spec = spec_of(config)
    if spec.format is None or not spec.generates:
        return
    for name in ("bos", "eos", "pad"):
        want = getattr(text, f"{name}_token_id", None)
        try:
            got = getattr(tokenizer, f"{name}_id")
        except KeyError:  # a tokenizer without that control token
            continue
        if want is not None and got is not None and got not in (want if isinstance(want, (list, tuple)) else [want]):
            raise ConfigError(f"{where}: the tokenizer's {name} id is {got}, the model's {name}_token_id {want}: "
                              "the tokenizer belongs to another model")
