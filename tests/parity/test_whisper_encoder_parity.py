"""Whisper's audio encoder: a tiny random HF WhisperModel dir -> pm.from_pretrained -> an AudioEncoder
with the same encoder states, from log-mel features and from 16 kHz waveforms (HF's feature extractor)."""

import numpy as np
import pytest
import torch

import polymodal as pm
from polymodal.encoders.audio import AudioEncoder

from randomise import randomise  # tests/parity/randomise.py

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")

MELS, POSITIONS = 16, 50  # 100 mel frames: 1 s at 16 kHz


def hf_whisper(cls):
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        vocab_size=64, num_mel_bins=MELS, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, max_source_positions=POSITIONS,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = cls(cfg)
    randomise(model, "layer_norm", "bias")
    return model.eval()


@pytest.fixture(scope="module", params=["WhisperModel", "WhisperForConditionalGeneration"])
def pair(request, tmp_path_factory):
    hf = hf_whisper(getattr(transformers, request.param))
    path = tmp_path_factory.mktemp("whisper")
    hf.save_pretrained(path)
    encoder = hf.model.encoder if hasattr(hf, "model") else hf.encoder
    return encoder, pm.from_pretrained(path)


def test_loads_the_encoder_only(pair):
    _, ours = pair
    assert isinstance(ours, AudioEncoder)
    assert ours.config.n_positions == POSITIONS and ours.config.n_mels == MELS


def test_encoder_states_match_hf(pair):
    hf, ours = pair
    features = torch.randn(3, MELS, 2 * POSITIONS)
    with torch.no_grad():
        expected = hf(features).last_hidden_state
        got = ours(features)
    assert got.shape == expected.shape == (3, POSITIONS, 32)
    assert (got - expected).abs().max() <= 1e-4


def test_waveform_to_states_matches_hf(pair):
    hf, ours = pair
    rng = np.random.default_rng(0)
    t = np.arange(12000) / 16000
    waves = [(0.5 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32),
             (0.1 * rng.standard_normal(16000)).astype(np.float32)]
    extractor = transformers.WhisperFeatureExtractor(feature_size=MELS, chunk_length=1)
    hf_features = torch.from_numpy(extractor(waves, sampling_rate=16000, return_tensors="np").input_features)
    ours_features = ours.features(waves, sampling_rate=16000)
    assert (ours_features - hf_features).abs().max() <= 1e-4
    with torch.no_grad():
        assert (ours(ours_features) - hf(hf_features).last_hidden_state).abs().max() <= 1e-4


def test_wrong_sample_rate_and_shape_are_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="expected audio sampled at 16000 Hz, got 8000 Hz"):
        ours.features(np.zeros(8000, dtype=np.float32), sampling_rate=8000)
    with pytest.raises(ValueError, match=r"input_features must be \(num_clips, 16, 100\) log-mel frames, "
                                         r"got \(1, 16, 3000\)"):
        ours(torch.zeros(1, MELS, 3000))
