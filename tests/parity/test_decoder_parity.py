"""Llama and Gemma: HF checkpoint dir -> pm.from_pretrained -> same logits and greedy tokens as HF."""

import pytest
import torch

import polymodal as pm
from polymodal.convert.hf import save_hf

from causal_lm import assert_greedy_matches, assert_logits_match, batch  # tests/parity/causal_lm.py
from randomise import randomise  # tests/parity/randomise.py

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")

CONFIGS = {
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa": ("llama", dict(num_key_value_heads=2, attention_bias=True, rope_theta=500000.0)),
    "llama-mqa-tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-mlp-bias": ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "llama3-rope-scaling": ("llama", dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-linear-rope-scaling": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                 "factor": 4.0})),
    "gemma-mqa": ("gemma", dict(num_key_value_heads=1, head_dim=16)),
    "gemma-gqa": ("gemma", dict(num_key_value_heads=2, head_dim=8)),
}


def hf_model(kind: str, overrides: dict):
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    theta = overrides.pop("rope_theta", None)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, **overrides)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GemmaConfig(**common, **overrides)
        model = transformers.GemmaForCausalLM(cfg)
    if theta is not None:
        model.config.rope_parameters["rope_theta"] = theta
        model = type(model)(model.config)
    randomise(model, "norm", "bias")  # off HF's ones/zeros init: a swapped bias must change the logits
    assert all(p.abs().sum() > 0 for name, p in model.named_parameters() if "bias" in name)
    return model.eval()


@pytest.fixture(params=list(CONFIGS))
def pair(request, tmp_path):
    kind, overrides = CONFIGS[request.param]
    torch.manual_seed(0)
    hf = hf_model(kind, dict(overrides))
    hf.save_pretrained(tmp_path / "hf")
    return hf, pm.from_pretrained(tmp_path / "hf"), kind


def test_logits_match_hf(pair):
    hf, ours = pair[:2]
    assert_logits_match(hf, ours)


def test_greedy_generation_matches_hf(pair):
    hf, ours = pair[:2]
    assert_greedy_matches(hf, ours)


def test_round_trip_to_hf_gives_identical_logits(pair, tmp_path):
    hf, ours, kind = pair
    save_hf(ours, tmp_path / "back", kind)
    back = type(hf).from_pretrained(tmp_path / "back").eval()
    ids, am = batch()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, attention_mask=am).logits, hf(input_ids=ids, attention_mask=am).logits)


def test_sharded_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    hf = hf_model("llama", {})
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = pm.from_pretrained(tmp_path / "sharded")
    ids, am = batch()
    with torch.no_grad():
        diff = (ours(ids, attention_mask=am).logits - hf(input_ids=ids, attention_mask=am).logits)[am.bool()]
    assert diff.abs().max() <= 1e-4
