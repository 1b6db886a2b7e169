"""Numbers that enter through a config: a bool or string field given a number, as an HF config.json may hold
(`"tie_word_embeddings": 0`), is an error that names the type the field wants; numpy numbers (a sweep over
np.arange) are kept as plain ones, so the config saves; a logit_scale of 0 (every logit 0, so greedy decoding writes
token 0 at every step) is refused; a position table too large for the machine (a decoder's learned one, a
ViT's, an audio encoder's) is refused before allocating, as every other absurd size."""

import json

import numpy as np
import pytest
import torch

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.errors import ConfigError


@pytest.mark.parametrize("field, value, expected", [
    ("tie_embeddings", 1, r"DecoderConfig.tie_embeddings must be true or false, got 1 \(int\)"),
    ("tie_embeddings", "false", r"DecoderConfig.tie_embeddings must be true or false, got 'false' \(str\)"),
    ("mlp", 2, r"DecoderConfig.mlp must be a string, got 2 \(int\)"),
    ("qk_norm", 1.0, r"DecoderConfig.qk_norm must be a string or None, got 1.0 \(float\)"),
])
def test_a_field_given_another_type_names_the_type_it_wants(field, value, expected):
    with pytest.raises(ConfigError, match=expected):
        DecoderConfig(**{field: value})


@pytest.mark.parametrize("scale", [0.0, -0.0625])
def test_a_logit_scale_that_is_not_positive_is_refused(scale):
    with pytest.raises(ConfigError, match=rf"DecoderConfig.logit_scale must be a finite number > 0, got {scale}"):
        DecoderConfig(logit_scale=scale)


def test_an_hf_config_with_a_number_for_a_bool_names_the_file_and_the_bool(tmp_path):
    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 4, "tie_word_embeddings": 0}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.json'}: DecoderConfig.tie_embeddings must be true "
                                          r"or false, got 0 \(int\)"):
        pm.from_pretrained(tmp_path)


def _huge_positions(which: str):
    if which == "decoder":  # a learned table of max_seq_len rows
        return DecoderConfig(vocab_size=64, dim=1024, n_layers=1, n_heads=4, hidden_dim=64, positions="learned",
                             max_seq_len=10**10)
    config = pm.PRESETS["paligemma-tiny" if which == "vision" else "gemini-tiny"]()
    if which == "vision":  # one row per patch
        return config.replace(vision=config.vision.replace(image_size=config.vision.patch_size * 10**5))
    return config.replace(audio=config.audio.replace(n_positions=10**11))  # one row per audio frame


@pytest.mark.parametrize("which", ["decoder", "vision", "audio"])
def test_a_position_table_too_large_for_memory_is_refused_before_allocating(which):
    with pytest.raises(ConfigError, match=r"would have at least \S+ parameters .* more than this machine's"):
        pm.build(_huge_positions(which))


def test_numpy_numbers_in_a_config_save_and_load_back(tmp_path):
    config = DecoderConfig(vocab_size=64, dim=np.int64(32), n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=32,
                           norm_eps=np.float32(1e-5))
    assert (type(config.dim), type(config.norm_eps)) == (int, float)
    model = pm.build(config).eval()
    pm.save_pretrained(model, tmp_path / "m")
    ids = torch.randint(0, 64, (1, 6))
    assert torch.equal(pm.from_pretrained(tmp_path / "m")(ids).logits, model(ids).logits)
