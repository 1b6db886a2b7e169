"""Position schemes: rotary (RoPE, Su et al. 2021), xPos (Sun et al. 2022), ALiBi (Press et al. 2021),
fixed sinusoids (Vaswani et al. 2017; Whisper's encoder), relative sinusoid scores (Transformer-XL; USM).

Each takes per-token position ids, so left padding and packed documents (positions reset per
document) need no special case. Rotary tables are built once per forward at the model level and
shared by every layer.

RoPE comes in two layouts: "half" rotates (x[:d/2], x[d/2:]) pairs as HF Llama/Gemma do;
"interleaved" rotates (x[2i], x[2i+1]) pairs as GPT-J and torchscale do. xPos is interleaved RoPE
whose queries are scaled by zeta**(n/base) and keys by zeta**(-m/base), so the product decays with
the distance n - m; torchscale centres n and m on the sequence, which cancels in the product.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from polymodal.nn.meta import ComputedBuffers

from polymodal.errors import ConfigError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class RotaryTables(NamedTuple):
    """cos/sin for queries and keys, each (B, 1, S, D); equal for RoPE, scaled apart for xPos."""

    cos_q: torch.Tensor
    sin_q: torch.Tensor
    cos_k: torch.Tensor
    sin_k: torch.Tensor
    interleaved: bool

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rot = rotate_interleaved if self.interleaved else rotate_half
        d = self.cos_q.shape[-1]
        if d < q.shape[-1]:  # partial rotary (Persimmon, GPT-NeoX): the first d dims turn, the rest pass
            (q, q_pass), (k, k_pass) = q.split((d, q.shape[-1] - d), -1), k.split((d, k.shape[-1] - d), -1)
            q, k = self.rotate(q, k)
            return torch.cat((q, q_pass), -1), torch.cat((k, k_pass), -1)
        q = (q * self.cos_q + rot(q) * self.sin_q).to(q.dtype)
        k = (k * self.cos_k + rot(k) * self.sin_k).to(k.dtype)
        return q, k


ROPE_SCALING_TYPES = ("linear", "llama3")


def scale_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Context extension: "linear" (position interpolation, Chen et al. 2023) divides every frequency
    by `factor`; "llama3" divides only the low frequencies and blends the band between
    (Llama 3.1's `rope_scaling`)."""
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ConfigError(f"rope scaling type must be one of {ROPE_SCALING_TYPES}, got {kind!r}")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(in_band, blended, scaled)


class Float32Constants(ComputedBuffers):
    """A module whose (computed) float buffers are float32 constants that `model.to(dtype)` / `.bfloat16()` must not
    round: those cast every float buffer, and a bf16 RoPE frequency turns position 4000 up to 0.7 rad
    off (HF's from_pretrained(dtype=...) keeps its frequencies float32). Moving to a device still moves them."""

    def _apply(self, fn, recurse=True):
        exact = {name: b for name, b in self.named_buffers(recurse=False) if b is not None}
        super()._apply(fn, recurse)
        for name, before in exact.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self


class Rotary(Float32Constants):
    """RoPE (`xpos_scale_base=None`) or xPos tables for given positions."""

    def __init__(self, head_dim: int, theta: float = 10000.0, *, interleaved: bool = False,
                 xpos_scale_base: float | None = None, scaling: dict | None = None):
        super().__init__()
        self.interleaved = interleaved or xpos_scale_base is not None
        self.xpos_scale_base = xpos_scale_base
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_computed()

    def computed(self) -> dict[str, torch.Tensor]:
        half = torch.arange(0, self.head_dim, 2, dtype=torch.float32)
        inv_freq = 1.0 / self.theta ** (half / self.head_dim)
        if self.scaling is not None:
            inv_freq = scale_frequencies(inv_freq, self.scaling)
        return {"inv_freq": inv_freq, "zeta": (half + 0.4 * self.head_dim) / (1.4 * self.head_dim)}

    def _expand(self, t: torch.Tensor) -> torch.Tensor:  # (B, S, D/2) -> (B, 1, S, D)
        t = t.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((t, t), dim=-1)
        return t.unsqueeze(1)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> RotaryTables:
        pos = positions.float()[..., None]  # (B, S, 1)
        angles = pos * self.inv_freq  # (B, S, D/2), float32 as HF computes it
        cos, sin = angles.cos(), angles.sin()
        if self.xpos_scale_base is None:
            cos, sin = self._expand(cos).to(dtype), self._expand(sin).to(dtype)
            return RotaryTables(cos, sin, cos, sin, self.interleaved)
        scale = self.zeta ** (pos / self.xpos_scale_base)  # (B, S, D/2)
        return RotaryTables(
            self._expand(cos * scale).to(dtype), self._expand(sin * scale).to(dtype),
            self._expand(cos / scale).to(dtype), self._expand(sin / scale).to(dtype),
            True,
        )


def sinusoids(length: int | torch.Tensor, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """(length, channels) fixed sin | cos position table (Vaswani et al. 2017 in Whisper's layout:
    all sines, then all cosines, timescales from 1 to max_timescale), for positions 0 .. length - 1 or for
    the given (N,) positions (relative ones may be negative)."""
    if channels % 2:
        raise ConfigError(f"sinusoidal positions need an even number of channels, got {channels}")
    increment = math.log(max_timescale) / max(channels // 2 - 1, 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))
    positions = torch.arange(length) if isinstance(length, int) else length.cpu()
    angles = positions[:, None].float() * inv_timescales[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=1)


class RelativePositionBias(torch.nn.Module):
    """The position half of Transformer-XL's relative scores (Dai et al. 2019), as USM's Conformer (and Gemma
    3n's audio tower) use it: sinusoids of the distance query - key, projected to every head (`pos_proj`),
    dotted with the query. Distances outside -max_forward .. max_back get 0 (the window masks them)."""

    def __init__(self, dim: int, n_heads: int, head_dim: int):
        super().__init__()
        self.dim, self.n_heads, self.head_dim = dim, n_heads, head_dim
        self.pos_proj = torch.nn.Linear(dim, n_heads * head_dim, bias=False)

    def forward(self, q: torch.Tensor, distance: torch.Tensor, max_back: int, max_forward: int) -> torch.Tensor:
        """q (B, nh, ..., S, hs), distance (S, L) long -> (B, nh, ..., S, L) scores."""
        spans = torch.arange(max_back, -max_forward - 1, -1)  # F distances, farthest back first
        r = self.pos_proj(sinusoids(spans, self.dim).to(device=q.device, dtype=q.dtype))
        r = r.unflatten(-1, (self.n_heads, self.head_dim)).transpose(0, 1)  # (nh, F, hs)
        r = r.reshape(1, self.n_heads, *[1] * (q.dim() - 4), *r.shape[1:])
        scores = q @ r.transpose(-1, -2)  # (B, nh, ..., S, F)
        outside = (distance > max_back) | (distance < -max_forward)
        index = (max_back - distance).clamp(0, spans.numel() - 1)
        scores = scores.gather(-1, index.expand(*scores.shape[:-1], index.shape[-1]))
        return scores.masked_fill(outside, 0.0)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Geometric head slopes 2**(-8i/n); for n not a power of two, the interleaved extension."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(closest)
    if closest < n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(Float32Constants):
    """Turns a boolean mask into a float bias -slope_h * |pos_q - pos_k| (-inf where masked)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.register_computed()

    def computed(self) -> dict[str, torch.Tensor]:
        return {"slopes": alibi_slopes(self.n_heads)}

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """positions (B, Sq), (B, Sk) -> float32 bias (B, H, Sq, Sk)."""
        distance = (q_pos[:, :, None] - k_pos[:, None, :]).abs().float().unsqueeze(1)
        return -self.slopes[None, :, None, None] * distance

    def forward(self, mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        # mask (B, 1, Sq, Sk) bool -> bias (B, H, Sq, Sk)
        return self.bias(q_pos, k_pos).masked_fill(~mask, float("-inf")).to(dtype)
