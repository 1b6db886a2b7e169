"""Perceiver Resampler (Flamingo, Alayrac et al. 2022, Sec. 2.1 / Fig. 5).

A fixed set of learned latents cross-attends to the features of one media; the keys and values are
the media features concatenated with the latents. A video's frames get a learned frame (time)
embedding and are flattened into one sequence, so a video of F frames also yields n_latents tokens.
Matches HF `IdeficsPerceiverResampler` (no time embeddings, ReLU MLP, optional qk LayerNorms); the
frame and media-time embeddings (GELU MLP) follow open_flamingo's `PerceiverResampler`.

Shapes: B batch, N media per sample, F frames per media, V features per frame, D width, n latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.config import Config, ConfigError, _check_choice, _check_positive
from polymodal.nn.attention import Attention
from polymodal.nn.mlp import make_mlp
from polymodal.nn.norms import LayerNorm


@dataclass
class PerceiverConfig(Config):
    """A `PerceiverResampler` (Flamingo's, Idefics', KOSMOS-1's); `build_resampler` makes one."""

    depth: int = 6
    n_heads: int = 8
    head_dim: int = 64
    n_latents: int = 64
    hidden_dim: int | None = None  # None: 4 * media width
    mlp: str = "gelu"  # "gelu" (Flamingo) | "relu" (Idefics)
    qk_norm: bool = False  # LayerNorm over each head of q and k
    max_media: int = 0  # learned media-time embeddings (0: none, any number of media)
    max_frames: int = 0  # learned frame embeddings for video (0: none, images only)
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_positive(self, "depth", "n_heads", "head_dim", "n_latents", "hidden_dim", "norm_eps")
        _check_choice("perceiver.mlp", self.mlp, ("gelu", "relu"))
        if self.max_media < 0 or self.max_frames < 0:
            raise ConfigError(f"max_media and max_frames must be >= 0, got {self.max_media}, {self.max_frames}")


class PerceiverBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, head_dim: int, hidden_dim: int, *, mlp: str = "gelu",
                 qk_norm: bool = False, eps: float = 1e-5):
        super().__init__()
        self.media_norm, self.latent_norm = LayerNorm(dim, eps), LayerNorm(dim, eps)
        head_norm = (lambda: LayerNorm(head_dim, eps)) if qk_norm else (lambda: None)
        self.attn = Attention(dim, n_heads, head_dim=head_dim, kv_dim=dim, qk_norm=head_norm(), k_norm=head_norm())
        self.mlp_norm = LayerNorm(dim, eps)
        self.mlp = make_mlp(mlp, dim, hidden_dim)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x (B', F*V, D) media features, latents (B', n, D) -> (B', n, D)."""
        q = self.latent_norm(latents)
        kv = torch.cat((self.media_norm(x), q), dim=1)  # the latents also attend to themselves
        latents = latents + self.attn(q, kv)
        return latents + self.mlp(self.mlp_norm(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int, *, depth: int, n_heads: int, head_dim: int, n_latents: int, hidden_dim: int,
                 max_media: int = 0, max_frames: int = 0, mlp: str = "gelu", qk_norm: bool = False,
                 eps: float = 1e-5):
        """max_media / max_frames: number of learned media-time / frame embeddings (0: none; then any
        number of media, and one frame per media)."""
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, dim))
        self.media_time_embeds = nn.Parameter(torch.randn(max_media, dim)) if max_media else None
        self.frame_embeds = nn.Parameter(torch.randn(max_frames, dim)) if max_frames else None
        self.layers = nn.ModuleList(
            PerceiverBlock(dim, n_heads, head_dim, hidden_dim, mlp=mlp, qk_norm=qk_norm, eps=eps) for _ in range(depth))
        self.norm = LayerNorm(dim, eps)

    def check_media(self, n_media: int, n_frames: int) -> None:
        """More media or frames than there are time embeddings is an error, not a silent truncation."""
        max_frames = 1 if self.frame_embeds is None else self.frame_embeds.shape[0]
        if n_frames > max_frames:
            raise ConfigError(f"got {n_frames} frames per media, but the perceiver has frame embeddings for {max_frames}"
                             + (" (it has none: images only)" if self.frame_embeds is None else ""))
        if self.media_time_embeds is not None and n_media > self.media_time_embeds.shape[0]:
            raise ConfigError(f"got {n_media} media per sample, but the perceiver has media-time embeddings for "
                             f"{self.media_time_embeds.shape[0]}")

    def forward(self, media: torch.Tensor, media_mask: torch.Tensor | None = None) -> torch.Tensor:
        """media (B, N, V, D) images or (B, N, F, V, D) videos; media_mask (B, N) bool, False for padding
        media (their output is zero) -> (B, N, n, D)."""
        if media.dim() == 4:
            media = media.unsqueeze(2)
        if media.dim() != 5 or media.shape[-1] != self.latents.shape[1]:
            raise ConfigError(f"perceiver input must be (B, N, V, {self.latents.shape[1]}) or "
                             f"(B, N, F, V, {self.latents.shape[1]}), got shape {tuple(media.shape)}")
        B, N, F = media.shape[:3]
        self.check_media(N, F)
        if media_mask is not None and media_mask.shape != (B, N):
            raise ConfigError(f"media_mask must have shape {(B, N)}, got {tuple(media_mask.shape)}")
        if self.frame_embeds is not None:
            media = media + self.frame_embeds[:F, None]  # (F, 1, D): one embedding per frame
        x = media.flatten(2, 3)  # (B, N, F*V, D)
        if self.media_time_embeds is not None:
            x = x + self.media_time_embeds[:N, None]  # (N, 1, D)
        x = x.flatten(0, 1)  # (B*N, F*V, D): each media is resampled on its own
        latents = self.latents.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        out = self.norm(latents).unflatten(0, (B, N))  # (B, N, n, D)
        if media_mask is not None:
            out = out.masked_fill(~media_mask.bool()[:, :, None, None], 0.0)
        return out


def build_resampler(dim: int, p: PerceiverConfig) -> PerceiverResampler:
    """The resampler a config describes, over media features of width `dim`."""
    return PerceiverResampler(dim, depth=p.depth, n_heads=p.n_heads, head_dim=p.head_dim, n_latents=p.n_latents,
                              hidden_dim=p.hidden_dim or 4 * dim, max_media=p.max_media, max_frames=p.max_frames,
                              mlp=p.mlp, qk_norm=p.qk_norm, eps=p.norm_eps)
