"""USM's Conformer audio encoder (Zhang et al. 2023, "Google USM"; Gulati et al. 2020), as Gemma 3n's audio
tower has it (HF `Gemma3nAudioEncoder`, matched weight for weight):

- sub-sampling: padded bias-free Conv2d blocks over (time, mel), each with a group norm whose statistics
  accumulate over time, and ReLU; then a linear projection to the width;
- Conformer blocks: a half-step feed-forward, chunked local self-attention (looking back only) with a
  relative position term, a per-dimension softplus query scale and a tanh cap on the scores, a light
  convolution module (GLU, causal depthwise Conv1d), a second half-step feed-forward, an RMSNorm;
- a final time reduction (every `reduction`-th frame).

Everything looks back only, but the sub-sampling convolutions look `sub_kernel - 1` frames ahead: a
`ConformerStream` encodes a stream chunk by chunk, keeping each piece's left context (and holding back
the frames the convolutions still need), and gives what the whole clip gives. The whole-clip forward is
that stream run once to its end, so there is one code path.

Shapes: B clips, T mel frames, M mel bins, N encoder frames, D width. Masks are True for valid frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import Config, ConfigError, _check_positive
from polymodal.errors import InputError, check_mask, check_media
from polymodal.nn.attention import Attention
from polymodal.nn.masks import LocalWindow
from polymodal.nn.mlp import MLP
from polymodal.nn.norms import RMSNorm
from polymodal.nn.positions import RelativePositionBias


@dataclass
class ConformerConfig(Config):
    """Defaults are Gemma 3n's audio tower (HF `Gemma3nAudioConfig` names in comments)."""

    n_mels: int = 128  # input_feat_size
    dim: int = 1536  # hidden_size
    n_layers: int = 12  # conf_num_hidden_layers
    n_heads: int = 8  # conf_num_attention_heads
    chunk: int = 12  # conf_attention_chunk_size
    left_context: int = 13  # conf_attention_context_left: frames a query sees back, itself included
    logit_cap: float = 50.0  # conf_attention_logit_cap
    conv_kernel: int = 5  # conf_conv_kernel_size
    reduction: int = 4  # conf_reduction_factor
    residual_weight: float = 0.5  # conf_residual_weight: the half step of each feed-forward
    sub_channels: tuple[int, ...] = (128, 32)  # sscp_conv_channel_size
    sub_kernel: int = 3  # sscp_conv_kernel_size (square)
    sub_stride: int = 2  # sscp_conv_stride_size (square)
    group_norm_eps: float = 1e-3  # sscp_conv_group_norm_eps
    norm_eps: float = 1e-6  # rms_norm_eps
    clip: float = 1e10  # gradient_clipping: activations are clamped to +-clip

    def __post_init__(self) -> None:
        _check_positive(self, "n_mels", "dim", "n_layers", "n_heads", "chunk", "left_context", "logit_cap",
                        "conv_kernel", "reduction", "sub_kernel", "sub_stride", "group_norm_eps", "norm_eps", "clip")
        if self.dim % self.n_heads:
            raise ConfigError(f"conformer dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.dim % 2:
            raise ConfigError(f"conformer dim must be even for its sinusoidal relative positions, got {self.dim}")
        if not self.sub_channels or any(not isinstance(c, int) or c < 1 for c in self.sub_channels):
            raise ConfigError(f"sub_channels must be positive channel counts, one per sub-sampling conv, "
                              f"got {self.sub_channels!r}")
        self.sub_channels = tuple(self.sub_channels)  # JSON gives a list

    @property
    def window(self) -> LocalWindow:
        return LocalWindow(self.chunk, self.left_context - 1)

    @property
    def time_stride(self) -> int:
        """Mel frames per sub-sampled frame."""
        return self.sub_stride ** len(self.sub_channels)

    def output_frames(self, mel_frames: int) -> int:
        """Encoder frames of a clip of this many log-mel frames: each stride and the reduction round up."""
        n = mel_frames
        for _ in self.sub_channels:
            n = -(-n // self.sub_stride)
        return -(-n // self.reduction)


def keep_last(x: torch.Tensor, n: int) -> torch.Tensor:
    """The last n frames of (B, T, ...) (none for n = 0)."""
    return x[:, x.shape[1] - min(n, x.shape[1]):]


class CumulativeGroupNorm(nn.Module):
    """Group norm with one group over (freq, channels) whose mean and variance accumulate over time, so a
    frame's statistics come from it and the frames before it (Lingvo's cumulative GroupNorm). The running
    sums are the state a stream carries."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, tuple]:
        """x (B, T, F, C) -> same, and (sum, count, squared deviations) so far, each (B, 1, 1, 1) float32."""
        x32 = x.float()
        sums, count, squares = state if state is not None else (0.0, 0.0, 0.0)
        sums = sums + x32.sum((2, 3), keepdim=True).cumsum(1)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
        count = count + steps * x[0, 0].numel()
        mean = sums / count
        squares = squares + (x32 - mean).pow(2).sum((2, 3), keepdim=True).cumsum(1)
        y = (x32 - mean) * torch.rsqrt(squares / count + self.eps) * self.weight.float()
        return y.to(x.dtype), (sums[:, -1:], count[:, -1:], squares[:, -1:])


class SubsampleConv(nn.Module):
    """A bias-free Conv2d over (time, freq), freq padded by one each side, then the cumulative norm and ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, freq_in: int, eps: float):
        super().__init__()
        self.kernel, self.stride, self.freq_in = kernel, stride, freq_in
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, bias=False)
        self.norm = CumulativeGroupNorm(c_out, eps)
        self.freq_out = (freq_in + 2 - kernel) // stride + 1

    def forward(self, x: torch.Tensor, pending: torch.Tensor, state: tuple | None, final: bool):
        """x (B, C, T, F) new frames after `pending` (frames held back) -> (B, C', T', F') for every output whose
        input has arrived (at the end, the time axis is zero-padded by kernel - 1), and what to hold back."""
        x = torch.cat((pending, x.to(self.conv.weight.dtype)), 2)
        if final:
            x = F.pad(x, (0, 0, 0, self.kernel - 1))
        n_out = max(0, (x.shape[2] - self.kernel) // self.stride + 1)
        pending = x[:, :, n_out * self.stride:] if not final else x[:, :, :0]
        if n_out == 0:
            return x.new_zeros(x.shape[0], self.conv.out_channels, 0, self.freq_out), pending, state
        y = self.conv(F.pad(x[:, :, :(n_out - 1) * self.stride + self.kernel], (1, 1)))  # (B, C', n_out, F')
        y, state = self.norm(y.permute(0, 2, 3, 1), state)
        return F.relu(y).permute(0, 3, 1, 2), pending, state


class FeedForward(nn.Module):
    """x + w * norm(MLP(norm(x))), a SiLU MLP four times as wide: the Conformer's half-step (Macaron) FFN."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.pre_norm, self.post_norm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, 4 * cfg.dim, gated=False, activation="silu")
        self.clip, self.weight = cfg.clip, cfg.residual_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(self.pre_norm(x.clamp(-self.clip, self.clip))).clamp(-self.clip, self.clip)
        return x + self.post_norm(h) * self.weight


class LightConv(nn.Module):
    """The Conformer's convolution module, light: norm, linear to 2D, GLU, causal depthwise Conv1d, norm, SiLU,
    linear; added to the input."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.pre_norm, self.conv_norm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)
        self.linear_start = nn.Linear(cfg.dim, 2 * cfg.dim, bias=False)
        self.depthwise = nn.Conv1d(cfg.dim, cfg.dim, cfg.conv_kernel, groups=cfg.dim, bias=False)
        self.linear_end = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.clip = cfg.clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(self.pre_norm(x)), dim=-1).transpose(1, 2)  # (B, D, T)
        h = self.depthwise(F.pad(h, (self.depthwise.kernel_size[0] - 1, 0))).transpose(1, 2)
        h = self.linear_end(F.silu(self.conv_norm(h.clamp(-self.clip, self.clip))))
        return x + h


class LayerPast(NamedTuple):
    """A block's left context: the last inputs of its attention and of its convolution."""

    attn: torch.Tensor  # (B, <= left, D)
    conv: torch.Tensor  # (B, <= kernel - 1, D)


class ConformerBlock(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        head_dim = cfg.dim // cfg.n_heads
        self.ffw_start, self.ffw_end = FeedForward(cfg), FeedForward(cfg)
        self.attn_norm, self.attn_post_norm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads, per_dim_scale=True, softcap=cfg.logit_cap,
                              rel_pos=RelativePositionBias(cfg.dim, cfg.n_heads, head_dim))
        self.lconv = LightConv(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.window, self.clip, self.kernel = cfg.window, cfg.clip, cfg.conv_kernel

    def forward(self, x: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor,
                past: LayerPast) -> tuple[torch.Tensor, LayerPast]:
        """x (B, T, D) new frames, valid (B, T); mask: the window's over the past and new frames."""
        c = self.clip
        x = self.ffw_start(x)
        h = torch.cat((past.attn, x), 1)
        y = self.attn(self.attn_norm(h.clamp(-c, c)), mask=mask, window=self.window)[:, past.attn.shape[1]:]
        x = (x + self.attn_post_norm(y.clamp(-c, c))) * valid[..., None]
        h_conv = torch.cat((past.conv, x), 1)
        x = self.lconv(h_conv)[:, past.conv.shape[1]:]
        x = self.norm(self.ffw_end(x).clamp(-c, c))
        return x, LayerPast(keep_last(h, self.window.left), keep_last(h_conv, self.kernel - 1))


class ConformerOutput(NamedTuple):
    states: torch.Tensor  # (B, N, D), zero at padding
    mask: torch.Tensor  # (B, N) bool, True for valid frames


class ConformerEncoder(nn.Module):
    def __init__(self, config: ConformerConfig):
        super().__init__()
        cfg = self.config = config
        convs, freq, c_in = [], cfg.n_mels, 1
        for c_out in cfg.sub_channels:
            convs.append(SubsampleConv(c_in, c_out, cfg.sub_kernel, cfg.sub_stride, freq, cfg.group_norm_eps))
            freq, c_in = convs[-1].freq_out, c_out
        self.subsample = nn.ModuleList(convs)
        self.input_proj = nn.Linear(freq * c_in, cfg.dim, bias=False)
        self.layers = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.n_layers))

    def check_features(self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None) -> None:
        check_media("input_features", input_features, ("num_clips", "num_frames", self.config.n_mels), "log-mel frames")
        if input_features_mask is not None:
            check_mask(input_features_mask, tuple(input_features.shape[:2]))

    def forward(self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None) -> ConformerOutput:
        """input_features (B, T, M) log-mel (`encoders.usm_features`), input_features_mask (B, T) True for valid
        frames (default: all) -> states (B, N, D) and their mask, N = ceil(T / time_stride / reduction)."""
        self.check_features(input_features, input_features_mask)
        return ConformerStream(self, input_features.shape[0])._step(input_features, input_features_mask, True)

    def stream(self, batch: int = 1) -> ConformerStream:
        """A stream of `batch` clips encoded chunk by chunk (`ConformerStream.push`)."""
        return ConformerStream(self, batch)


class ConformerStream:
    """An encoder's left context between chunks of a stream: the frames each sub-sampling conv holds back and
    its running norm statistics, each block's past inputs, and how many frames came out (for the reduction).
    Concatenating what `push` returns for every chunk, the last with final=True, gives the whole clip's states."""

    def __init__(self, encoder: ConformerEncoder, batch: int):
        self.encoder, self.ended = encoder, False
        w = encoder.input_proj.weight
        self.pending = [torch.zeros(batch, conv.conv.in_channels, 0, conv.freq_in, dtype=w.dtype, device=w.device)
                        for conv in encoder.subsample]
        self.norms: list[tuple | None] = [None] * len(self.pending)
        empty = torch.zeros(batch, 0, encoder.config.dim, dtype=w.dtype, device=w.device)
        self.past = [LayerPast(empty, empty) for _ in encoder.layers]
        self.frames = 0  # sub-sampled frames so far

    def push(self, features: torch.Tensor, *, final: bool = False) -> ConformerOutput:
        """The next (B, T, M) log-mel frames of every stream -> the encoder frames they complete (T may be 0);
        final=True ends the stream (the convs' look-ahead is zero-padded)."""
        if self.ended:
            raise InputError("this audio stream has ended (final=True); start another with encoder.stream()")
        check_media("features", features, (len(self.past[0].attn), "frames", self.encoder.config.n_mels),
                    "log-mel frames")
        return self._step(features, None, final)

    def _step(self, features: torch.Tensor, mask: torch.Tensor | None, final: bool) -> ConformerOutput:
        """`push`, and for a whole clip (the first and final step) with a mask of valid frames."""
        enc, cfg = self.encoder, self.encoder.config
        self.ended = final
        x = features.unsqueeze(1)  # (B, 1, T, M)
        for i, conv in enumerate(enc.subsample):
            x, self.pending[i], self.norms[i] = conv(x, self.pending[i], self.norms[i], final)
        x = enc.input_proj(x.permute(0, 2, 3, 1).flatten(2))  # (B, n, F' * C')
        n = x.shape[1]
        valid = (torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None
                 else mask.bool()[:, ::cfg.time_stride][:, :n])
        if n:  # else the convs hold every frame back: nothing new for the blocks
            attn_mask = cfg.window.mask(F.pad(valid, (self.past[0].attn.shape[1], 0), value=True))
            for i, layer in enumerate(enc.layers):
                x, self.past[i] = layer(x, valid, attn_mask, self.past[i])
        start = -self.frames % cfg.reduction
        self.frames += n
        x, valid = x[:, start::cfg.reduction], valid[:, start::cfg.reduction]
        return ConformerOutput(x.masked_fill(~valid[..., None], 0.0), valid)
