"""The collator of each family, in one explicit dict: `collate.Collator` lays out the early-fusion
families and the text-only decoders; Flamingo (images apart from the tokens, per row) and the dual
encoders (image-caption pairs, no labels) batch their own way."""

from __future__ import annotations

from polymodal.data.collate import Collator, fit_config
from polymodal.data.interleaved import InterleavedCollator, InterleavedFormat
from polymodal.data.pairs import PairCollator, PairFormat
from polymodal.data.tokenizer import Tokenizer
from polymodal.models.contrastive import ContrastiveConfig
from polymodal.models.flamingo import FlamingoConfig

COLLATORS: dict[type, tuple[type, type]] = {  # config type -> (collator, format)
    FlamingoConfig: (InterleavedCollator, InterleavedFormat),
    ContrastiveConfig: (PairCollator, PairFormat),
}


def make_collator(config, tokenizer: Tokenizer, max_len: int | None = None):
    """The collator for the model built from `config`; max_len as in `Collator`."""
    return COLLATORS.get(type(config), (Collator,))[0](config, tokenizer, max_len)


def fit_to_tokenizer(config, tokenizer: Tokenizer):
    """The model config with its vocabulary size and special token ids taken from the tokenizer."""
    if type(config) in COLLATORS:
        return COLLATORS[type(config)][1].fit(config, tokenizer)
    return fit_config(config, tokenizer)
