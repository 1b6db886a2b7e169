"""USM's log-mel front end, as Gemma 3n feeds its audio tower (HF `Gemma3nAudioFeatureExtractor`): 16 kHz
waveforms padded to the longest clip (to a multiple of 128 samples), 32 ms frames every 10 ms, HTK-style
pre-emphasis, a periodic Hann window, a doubled ("overdriven") FFT, the magnitude through HTK mel filters
from 125 Hz to 7.6 kHz, and the natural log above a floor. Frames run along the time axis first, (B, T, M),
with a mask that is True for frames of the clip (the `ConformerEncoder`'s input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from polymodal.encoders.mel import mel_filterbank
from polymodal.errors import ConfigError


@dataclass
class UsmFeatureExtractor:
    n_mels: int = 128
    sampling_rate: int = 16000
    frame_ms: float = 32.0
    hop_ms: float = 10.0
    f_min: float = 125.0
    f_max: float = 7600.0
    preemphasis: float = 0.97
    mel_floor: float = 1e-5
    pad_to_multiple_of: int = 128  # samples
    max_samples: int = 480_000  # longer clips are cut (30 s)

    def __post_init__(self) -> None:
        if min(self.n_mels, self.sampling_rate, self.frame_ms, self.hop_ms, self.mel_floor, self.pad_to_multiple_of,
               self.max_samples) <= 0 or not 0 <= self.f_min < self.f_max <= self.sampling_rate / 2:
            raise ConfigError(f"sizes must be positive and 0 <= f_min < f_max <= sampling_rate / 2, got {self}")

    @cached_property
    def _filters(self) -> torch.Tensor:  # built at the first clip: counting frames (on the meta device too) needs none
        return mel_filterbank(self.n_mels, self.fft_length, self.sampling_rate, f_min=self.f_min, f_max=self.f_max,
                              htk=True)

    @property
    def frame_length(self) -> int:
        return round(self.sampling_rate * self.frame_ms / 1000)

    @property
    def hop_length(self) -> int:
        return round(self.sampling_rate * self.hop_ms / 1000)

    @property
    def fft_length(self) -> int:
        return 2 * 2 ** math.ceil(math.log2(self.frame_length))

    def n_frames(self, samples: int) -> int:
        """Frames of a clip of this many samples (padded to a multiple of pad_to_multiple_of)."""
        padded = -(-min(samples, self.max_samples) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return max(0, (padded - self.frame_length - 1) // self.hop_length + 1)

    def __call__(self, waveforms: np.ndarray | list[np.ndarray], *,
                 sampling_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
        """1-D waveforms -> input_features (B, T, M) float32 and input_features_mask (B, T) bool."""
        if sampling_rate != self.sampling_rate:
            raise ConfigError(f"expected audio sampled at {self.sampling_rate} Hz, got {sampling_rate} Hz; "
                              "resample it first")
        batch = [waveforms] if isinstance(waveforms, np.ndarray) else list(waveforms)
        if not batch:
            raise ConfigError("expected at least one waveform, got an empty list")
        for i, wave in enumerate(batch):
            if not isinstance(wave, np.ndarray) or wave.ndim != 1 or not np.issubdtype(wave.dtype, np.floating):
                raise ConfigError(f"waveform {i}: expected a 1-D (mono) numpy array of float samples, got "
                                  f"{getattr(wave, 'shape', type(wave))} {getattr(wave, 'dtype', '')}".rstrip())
        lengths = [min(len(w), self.max_samples) for w in batch]
        padded = -(-max(lengths) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        x = torch.zeros(len(batch), padded)
        for i, (wave, n) in enumerate(zip(batch, lengths)):
            x[i, :n] = torch.from_numpy(wave[:n].astype(np.float32))
        features = self._log_mel(x)
        starts = torch.arange(features.shape[1]) * self.hop_length
        return features, starts[None, :] < torch.tensor(lengths)[:, None]

    def _log_mel(self, x: torch.Tensor) -> torch.Tensor:
        n = self.frame_length
        frames = x.unfold(-1, n + 1, self.hop_length)  # (B, T, n + 1)
        if frames.shape[1] == 0:
            raise ConfigError(f"clips must be at least {n + 1} samples ({self.frame_ms:g} ms) long, "
                              f"got {x.shape[1]}")
        # HTK pre-emphasis: the first sample scaled by (1 - p), then y[i] = x[i] - p x[i-1], on n of n + 1 samples
        frames = torch.cat((frames[..., :1] * (1 - self.preemphasis),
                            frames[..., 1:-1] - self.preemphasis * frames[..., :-2]), -1)
        window = 0.5 * (1 - torch.cos(2 * math.pi * torch.arange(n, dtype=torch.float32) / n))
        magnitude = torch.fft.rfft(frames * window, n=self.fft_length).abs()
        mel = magnitude.double() @ self._filters
        return mel.clamp(min=self.mel_floor).log().float()
