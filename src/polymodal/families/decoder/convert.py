"""HF `LlamaForCausalLM`, `GemmaForCausalLM` and `CohereForCausalLM` checkpoint directories <-> polymodal `Decoder`,
through the decoder layout of `convert/rules.py` (shared with every family that holds such a decoder); Cohere's is
Llama's with parallel blocks (`convert/hf_cohere.py`)."""

from __future__ import annotations

from dataclasses import replace

from polymodal.convert.hf_cohere import cohere_config_from_hf, cohere_config_to_hf, cohere_rules
from polymodal.convert.rules import (Family, causal_lm_config_from_hf, decoder_config_to_hf, decoder_rules,
                                    tied_head)
from polymodal.nn.transformer import Decoder


LLAMA, GEMMA = (Family(
    config_from_hf=lambda hf, g=gemma: causal_lm_config_from_hf(hf, gemma=g),
    build=Decoder,
    rules=decoder_rules,
    config_to_hf=lambda cfg, g=gemma: decoder_config_to_hf(cfg, gemma=g),
    ignore=("rotary_emb.inv_freq",),
    tied_head=tied_head("lm_head.weight", "model.embed_tokens.weight"),
) for gemma in (False, True))


COHERE = replace(LLAMA, config_from_hf=cohere_config_from_hf, rules=cohere_rules, config_to_hf=cohere_config_to_hf)
