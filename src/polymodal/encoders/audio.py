"""Audio encoder: 16 kHz waveform -> log-mel -> convolutional subsampling -> transformer encoder.

Whisper's encoder (Radford et al. 2022), matching HF `WhisperEncoder` weight for weight: two
GELU Conv1d layers (the second with stride 2, halving the frame rate to 50 Hz), fixed sinusoidal
positions, pre-LN blocks (the ViT's `encoder_blocks`), a final LayerNorm. The log-mel front end
is `encoders.mel.AudioFeatureExtractor` (Whisper-exact).

Shapes: B clips, M mel bins, T mel frames (= 2 * n_positions), N = T / 2 encoder frames, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import Config, ConfigError, _check_positive
from polymodal.encoders.mel import AudioFeatureExtractor
from polymodal.errors import check_media
from polymodal.encoders.vit import encoder_blocks
from polymodal.nn.norms import LayerNorm
from polymodal.nn.positions import sinusoids


@dataclass
class AudioConfig(Config):
    n_mels: int = 80
    n_positions: int = 1500  # encoder frames per clip (HF max_source_positions); 1500 = Whisper's 30 s
    dim: int = 384
    n_layers: int = 4
    n_heads: int = 6
    hidden_dim: int = 1536
    norm_eps: float = 1e-5
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400

    def __post_init__(self) -> None:
        _check_positive(self, "n_mels", "n_positions", "dim", "n_layers", "n_heads", "hidden_dim", "norm_eps",
                        "sampling_rate", "hop_length", "n_fft")
        if self.dim % self.n_heads:
            raise ConfigError(f"audio dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.dim % 2:
            raise ConfigError(f"audio dim must be even for sinusoidal positions, got {self.dim}")

    @property
    def n_frames(self) -> int:
        """Mel frames per clip: the stride-2 convolution halves them into n_positions."""
        return 2 * self.n_positions

    @property
    def chunk_samples(self) -> int:
        return self.n_frames * self.hop_length


class AudioEncoder(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        cfg = self.config = config
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.dim, cfg.dim, kernel_size=3, stride=2, padding=1)
        # Fixed, but kept in the state dict: Whisper checkpoints store the table.
        self.register_buffer("pos_embed", sinusoids(cfg.n_positions, cfg.dim))
        self.layers = encoder_blocks(cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden_dim, "gelu", cfg.norm_eps)
        self.norm = LayerNorm(cfg.dim, cfg.norm_eps)
        self._extractor: AudioFeatureExtractor | None = None

    def feature_extractor(self) -> AudioFeatureExtractor:
        cfg = self.config
        if cfg.chunk_samples % cfg.sampling_rate:
            raise ConfigError(f"{cfg.n_frames} mel frames of {cfg.hop_length} samples are not a whole number of "
                              f"seconds at {cfg.sampling_rate} Hz; the log-mel front end needs whole seconds")
        if self._extractor is None:
            self._extractor = AudioFeatureExtractor(cfg.n_mels, cfg.sampling_rate, cfg.hop_length, cfg.n_fft,
                                                    cfg.chunk_samples // cfg.sampling_rate)
        return self._extractor

    def features(self, waveforms: np.ndarray | list[np.ndarray], *, sampling_rate: int) -> torch.Tensor:
        """Mono waveforms -> log-mel input_features (B, M, T); a clip at another rate is an error."""
        return self.feature_extractor()(waveforms, sampling_rate=sampling_rate)

    def check_features(self, input_features: torch.Tensor) -> None:
        check_media("input_features", input_features, ("num_clips", self.config.n_mels, self.config.n_frames),
                    "log-mel frames")

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """(B, M, T) log-mel -> (B, N, D) encoder states."""
        self.check_features(input_features)
        x = F.gelu(self.conv1(input_features.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, N, D)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.layers:
            x = block(x)
        return self.norm(x)
