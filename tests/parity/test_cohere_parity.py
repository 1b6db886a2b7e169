"""Cohere: a tiny random HF `CohereForCausalLM` dir -> polymodal's Decoder with parallel blocks -> the same logits
and greedy tokens as HF, and back to an HF dir that HF reads to the same logits."""

import pytest
import torch

import polymodal as pm
from polymodal.convert.rules import export_state
from polymodal.families.decoder.convert import COHERE
from polymodal.nn.transformer import Decoder

from causal_lm import assert_greedy_matches, assert_logits_match, batch  # tests/parity/causal_lm.py
from randomise import randomise  # tests/parity/randomise.py

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")

CONFIGS = {
    "mha-tied": dict(num_key_value_heads=4),
    "mqa-bias-untied": dict(num_key_value_heads=1, attention_bias=True, tie_word_embeddings=False, logit_scale=0.5),
    "gqa": dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.CohereConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=128, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2, **CONFIGS[request.param])
    hf = transformers.CohereForCausalLM(cfg)
    randomise(hf, "norm", "bias")  # off HF's ones/zeros init
    hf.eval()
    path = tmp_path_factory.mktemp("cohere")
    hf.save_pretrained(path)
    ours = pm.from_pretrained(path)  # the user's path: model_type "cohere" in the decoder family's spec
    assert isinstance(ours, Decoder)
    return hf, ours


def test_logits_match_hf(pair):
    hf, ours = pair[:2]
    assert ours.config.parallel_blocks and all(layer.mlp_norm is None for layer in ours.layers)
    assert_logits_match(hf, ours)


def test_greedy_generation_matches_hf(pair):
    hf, ours = pair[:2]
    assert_greedy_matches(hf, ours)


def test_export_reads_back_in_hf(pair, tmp_path):
    hf, ours = pair
    back = transformers.CohereForCausalLM(transformers.CohereConfig(**COHERE.config_to_hf(ours.config)))
    missing, unexpected = back.load_state_dict(export_state(COHERE.rules(ours.config), ours.state_dict()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and back.config.tie_word_embeddings == (
        "lm_head.weight" in missing)
    ids, am = batch()
    with torch.no_grad():
        assert torch.equal(back.eval()(input_ids=ids, attention_mask=am).logits,
                           hf(input_ids=ids, attention_mask=am).logits)
