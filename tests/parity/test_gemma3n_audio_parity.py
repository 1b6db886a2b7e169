"""Gemma 3n's audio tower: 16 kHz waveforms -> HF `Gemma3nAudioFeatureExtractor` + `Gemma3nAudioEncoder` (tiny,
random) against polymodal's `UsmFeatureExtractor` + `ConformerEncoder` converted from the directories HF writes."""

import json

import numpy as np
import pytest
import torch

import polymodal as pm
from safetensors.torch import save_file

from polymodal.convert.hf_gemma3n_audio import GEMMA3N_AUDIO, GEMMA3N_AUDIO_TOWER, conformer_config_to_hf
from polymodal.convert.rules import export_state
from polymodal.encoders.conformer import ConformerEncoder
from polymodal.encoders.usm_features import UsmFeatureExtractor

from hf_direct import load_with_family  # tests/parity/hf_direct.py
from randomise import randomise  # tests/parity/randomise.py

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")
gemma3n = pytest.importorskip("transformers.models.gemma3n.modeling_gemma3n", reason="Gemma 3n is the reference")

MELS = 32
AUDIO = dict(input_feat_size=MELS, hidden_size=32, conf_num_attention_heads=4, conf_num_hidden_layers=2,
             conf_attention_chunk_size=4, conf_attention_context_left=5, conf_conv_kernel_size=3,
             sscp_conv_channel_size=[8, 4])


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    model = gemma3n.Gemma3nAudioEncoder(transformers.Gemma3nAudioConfig(**AUDIO))
    randomise(model, "norm", "per_dim_scale")  # off HF's ones/zeros: a mis-mapped norm must show
    return model.eval()


@pytest.fixture(scope="module")
def tower_dir(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3n_audio")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma3n_dir(hf, tmp_path_factory):
    """A whole Gemma 3n directory's layout (its text and vision towers need timm to build): the audio tower's
    tensors under their HF names beside a text tensor the audio reader must skip."""
    path = tmp_path_factory.mktemp("gemma3n")
    config = transformers.Gemma3nConfig(audio_config=AUDIO).to_dict()
    (path / "config.json").write_text(json.dumps(config))
    tensors = {f"model.audio_tower.{k}": v.contiguous() for k, v in hf.state_dict().items()}
    tensors["model.language_model.embed_tokens.weight"] = torch.zeros(4, 8)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def clips():
    """Two clips of unequal length: the shorter is padded in the batch."""
    rng = np.random.default_rng(0)
    t = np.arange(9000) / 16000
    return [(0.4 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32),
            (0.3 * rng.standard_normal(5200)).astype(np.float32)]


def test_features_match_hf():
    hf_features = transformers.Gemma3nAudioFeatureExtractor(feature_size=MELS)(clips(), return_tensors="pt")
    features, mask = UsmFeatureExtractor(n_mels=MELS)(clips(), sampling_rate=16000)
    assert features.shape == hf_features.input_features.shape
    assert (features - hf_features.input_features).abs().max() <= 1e-4
    assert torch.equal(mask, hf_features.input_features_mask)
    assert mask[0].all() and not mask[1].all()  # the second clip is padded


@pytest.mark.parametrize("layout", ["tower", "gemma3n"])
def test_encoder_states_match_hf_on_a_padded_batch(hf, tower_dir, gemma3n_dir, layout):
    if layout == "tower":  # the user's path: model_type "gemma3n_audio" in the conformer family's spec
        ours, unused = pm.from_pretrained(tower_dir), set()
    else:  # a whole Gemma 3n read for its audio tower alone, through the converter by hand
        ours, unused = load_with_family(GEMMA3N_AUDIO, gemma3n_dir)
    assert isinstance(ours, ConformerEncoder) and unused == set()
    features, mask = UsmFeatureExtractor(n_mels=MELS)(clips(), sampling_rate=16000)
    with torch.no_grad():
        expected = hf(features, ~mask)  # HF's encoder takes True for padding
        got = ours(features, mask)
    assert torch.equal(got.mask, ~expected.audio_mel_mask)
    assert got.mask[0].sum() > got.mask[1].sum() > 0
    for i in range(2):  # both items, the padded one included (its padding is zero on both sides)
        assert (got.states[i] - expected.last_hidden_state[i]).abs().max() <= 1e-4


def test_export_gives_back_hf_tensors_and_config(hf, tower_dir):
    ours = pm.from_pretrained(tower_dir)
    exported = export_state(GEMMA3N_AUDIO_TOWER.rules(ours.config), ours.state_dict())
    expected = hf.state_dict()
    assert set(exported) == set(expected)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    back = transformers.Gemma3nAudioConfig(**conformer_config_to_hf(ours.config))
    assert GEMMA3N_AUDIO_TOWER.config_from_hf(back.to_dict()) == ours.config
