"""Whisper's log-mel front end (Radford et al. 2022; HF `WhisperFeatureExtractor`): 16 kHz waveforms ->
log-mel features. Hann-window STFT, Slaney mel filterbank, log10, floor at 8 decades below the peak,
scale to about [-1, 1]. The audio encoder's input; the data formats use it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from polymodal.errors import ConfigError


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    # Slaney's scale: linear below 1 kHz, logarithmic above.
    log_part = 15.0 + torch.log(f.clamp(min=1000.0) / 1000.0) * (27.0 / math.log(6.4))
    return torch.where(f >= 1000.0, log_part, 3.0 * f / 200.0)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    log_part = 1000.0 * torch.exp((m.clamp(min=15.0) - 15.0) * (math.log(6.4) / 27.0))
    return torch.where(m >= 15.0, log_part, 200.0 * m / 3.0)


def _htk_hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def _htk_mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, sampling_rate: int, *, f_min: float = 0.0, f_max: float | None = None,
                   htk: bool = False) -> torch.Tensor:
    """Triangular mel filters over f_min..f_max (default: sampling_rate/2), (n_fft // 2 + 1, n_mels) float64:
    Slaney's scale, area-normalized (Whisper), or with htk=True the HTK scale 2595 log10(1 + f/700),
    unnormalized (USM, Gemma 3n)."""
    nyquist = sampling_rate / 2
    to_mel, to_hz = (_htk_hz_to_mel, _htk_mel_to_hz) if htk else (_hz_to_mel, _mel_to_hz)
    limits = to_mel(torch.tensor([f_min, nyquist if f_max is None else f_max], dtype=torch.float64))
    edges = to_hz(torch.linspace(float(limits[0]), float(limits[1]), n_mels + 2, dtype=torch.float64))
    bins = torch.linspace(0.0, nyquist, n_fft // 2 + 1, dtype=torch.float64)
    offsets = edges[None, :] - bins[:, None]  # (F, M+2)
    widths = edges.diff()
    rising, falling = -offsets[:, :-2] / widths[:-1], offsets[:, 2:] / widths[1:]
    filters = torch.minimum(rising, falling).clamp(min=0.0)
    if not htk:  # area normalization keeps the energy per channel roughly constant across the scale
        filters = filters * (2.0 / (edges[2:] - edges[:-2]))
    empty = (filters.amax(dim=0) == 0).nonzero().flatten().tolist()
    if empty:
        raise ConfigError(f"mel filters {empty} are empty: n_mels={n_mels} is too many for n_fft={n_fft}")
    return filters


@dataclass
class AudioFeatureExtractor:
    """Mono waveform -> (n_mels, chunk_length * sampling_rate // hop_length) log-mel, as Whisper.

    Waveforms are zero-padded or truncated to `chunk_length` seconds; smaller `chunk_length`
    and `n_mels` give tiny models short inputs.
    """

    n_mels: int = 80
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400
    chunk_length: int = 30
    _filters: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if min(self.n_mels, self.sampling_rate, self.hop_length, self.n_fft, self.chunk_length) <= 0:
            raise ConfigError(f"all sizes must be positive, got {self}")
        self._filters = mel_filterbank(self.n_mels, self.n_fft, self.sampling_rate).float()

    @property
    def n_samples(self) -> int:
        return self.chunk_length * self.sampling_rate

    @property
    def n_frames(self) -> int:
        return self.n_samples // self.hop_length

    def __call__(self, waveform: np.ndarray | list[np.ndarray], *, sampling_rate: int) -> torch.Tensor:
        """One 1-D waveform -> (n_mels, n_frames); a list of them -> (B, n_mels, n_frames)."""
        if sampling_rate != self.sampling_rate:
            raise ConfigError(f"expected audio sampled at {self.sampling_rate} Hz, got {sampling_rate} Hz; resample it first")
        batch = [waveform] if isinstance(waveform, np.ndarray) else list(waveform)
        if not batch:
            raise ConfigError("expected at least one waveform, got an empty list")
        x = torch.zeros(len(batch), self.n_samples)
        for i, wave in enumerate(batch):
            if not isinstance(wave, np.ndarray) or wave.ndim != 1:
                raise ConfigError(f"waveform {i}: expected a 1-D (mono) numpy array, got {getattr(wave, 'shape', type(wave))}")
            if not np.issubdtype(wave.dtype, np.floating):
                raise ConfigError(f"waveform {i}: expected float samples in [-1, 1], got dtype {wave.dtype}")
            wave = wave[: self.n_samples]
            x[i, : len(wave)] = torch.from_numpy(wave.astype(np.float32))
        features = self._log_mel(x)
        return features[0] if isinstance(waveform, np.ndarray) else features

    def _log_mel(self, x: torch.Tensor) -> torch.Tensor:
        window = torch.hann_window(self.n_fft)
        stft = torch.stft(x, self.n_fft, self.hop_length, window=window, return_complex=True)
        power = stft[..., :-1].abs() ** 2  # Whisper drops the last frame: n_samples / hop frames
        log_mel = (self._filters.T @ power).clamp(min=1e-10).log10()  # (B, n_mels, T)
        # Keep 8 decades below each clip's peak, then scale to about [-1, 1].
        log_mel = torch.maximum(log_mel, log_mel.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log_mel + 4.0) / 4.0
