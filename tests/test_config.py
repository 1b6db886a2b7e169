import json

import pytest

from polymodal.config import ConfigError, DecoderConfig
from polymodal.families import load_config


def test_json_round_trip(tmp_path):
    cfg = DecoderConfig(dim=96, n_heads=6, n_kv_heads=2, positions="alibi", eos_token_id=[1, 2])
    cfg.to_json(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim=100, n_heads=8), r"dim \(100\) must be divisible by n_heads \(8\)"),
    (dict(n_heads=8, n_kv_heads=3), r"n_heads \(8\) must be a multiple of n_kv_heads \(3\)"),
    (dict(positions="rotary"), r"positions must be one of \['rope', 'alibi', 'xpos', 'learned', 'none'\], got 'rotary'"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(n_layers=0), r"DecoderConfig.n_layers must be a finite number > 0, got 0"),
    (dict(dim=24, n_heads=8, positions="rope"), r"rope needs an even head_dim, got 3"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), r"rope_scaling.rope_type must be one of \['linear', 'llama3'\]"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), r"needs \['high_freq_factor', 'low_freq_factor', "),
])
def test_inconsistent_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DecoderConfig(**kwargs)


def test_unknown_option_is_an_error_naming_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['n_head'\] for DecoderConfig; valid options: .*'n_heads'"):
        DecoderConfig.from_dict({"n_head": 4})


@pytest.mark.parametrize("data,message", [
    ({"n_layers": "2"}, r"DecoderConfig.n_layers must be int, got '2' \(str\)"),
    ({"n_layers": 2.0}, r"DecoderConfig.n_layers must be int, got 2.0 \(float\)"),
    ({"tie_embeddings": 1}, r"DecoderConfig.tie_embeddings must be bool, got 1 \(int\)"),
    ({"dim": True}, r"DecoderConfig.dim must be int, got True \(bool\)"),
    ({"rope_scaling": "linear"}, r"DecoderConfig.rope_scaling must be dict or None, got 'linear' \(str\)"),
])
def test_a_value_of_the_wrong_type_is_an_error_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        DecoderConfig.from_dict(data)


def test_json_numbers_fill_float_fields_and_none_fills_optional_ones():
    cfg = DecoderConfig.from_dict({"norm_eps": 1, "rope_scaling": None, "eos_token_id": [1, 2]})
    assert cfg.norm_eps == 1 and cfg.rope_scaling is None and cfg.eos_token_ids == [1, 2]


def test_unknown_config_class_in_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"config_class": "Nope"}))
    with pytest.raises(ConfigError, match="config_class must be one of"):
        load_config(tmp_path / "config.json")
