"""The audio encoder on its own: shapes, gradients, save/load, and its input checks.
(Whisper parity: tests/parity/test_whisper_encoder_parity.py.)"""

import numpy as np
import pytest
import torch

import polymodal as pm
from polymodal.config import ConfigError
from polymodal.encoders.audio import AudioConfig, AudioEncoder
from polymodal.nn.positions import sinusoids

CFG = AudioConfig(n_mels=16, n_positions=25, dim=32, n_layers=2, n_heads=4, hidden_dim=64)  # 0.5 s clips


def test_shapes_and_gradients():
    model = AudioEncoder(CFG)
    x = torch.randn(2, 16, 50, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 25, 32)
    y.square().mean().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in model.parameters())


def test_positions_are_fixed_sinusoids_and_travel_with_the_weights(tmp_path):
    model = AudioEncoder(CFG)
    assert torch.equal(model.pos_embed, sinusoids(25, 32))
    assert "pos_embed" not in dict(model.named_parameters())
    pm.save_pretrained(model, tmp_path / "audio")
    back = pm.from_pretrained(tmp_path / "audio")
    x = torch.randn(1, 16, 50)
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))


ONE_SECOND = AudioConfig(n_mels=16, n_positions=50, dim=32, n_layers=1, n_heads=4, hidden_dim=64)


def test_features_from_waveforms():
    model = AudioEncoder(ONE_SECOND)
    features = model.features([np.zeros(16000, np.float32), np.zeros(4000, np.float32)], sampling_rate=16000)
    assert features.shape == (2, 16, 100)  # padded to the 1 s the encoder reads


def test_input_errors():
    model = AudioEncoder(CFG)
    with pytest.raises(ValueError, match=r"input_features must be \(num_clips, 16, 50\) log-mel frames, got \(2, 80, 50\)"):
        model(torch.zeros(2, 80, 50))
    with pytest.raises(ValueError, match="expected audio sampled at 16000 Hz, got 44100 Hz"):
        AudioEncoder(ONE_SECOND).features(np.zeros(44100, np.float32), sampling_rate=44100)
    with pytest.raises(ConfigError, match="divisible by n_heads"):
        AudioConfig(dim=30, n_heads=4)
    with pytest.raises(ConfigError, match="50 mel frames of 160 samples are not a whole number of seconds"):
        model.features(np.zeros(100, np.float32), sampling_rate=16000)
