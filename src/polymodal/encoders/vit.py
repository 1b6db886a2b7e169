"""One Vision Transformer (Dosovitskiy et al. 2020) for CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023).

CLIP: class token, bias-free patch embedding, LayerNorm before the encoder, quick-GELU, pooled =
post-LN of the class token. SigLIP: no class token, GELU-tanh, post-LN over all patches, pooled by
a multihead attention-pooling (MAP) head. Matches HF `CLIPVisionModel` and `SiglipVisionModel`.
The encoder stack (`encoder_blocks`) is shared with the text towers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.config import Config, ConfigError, _check_choice, _check_positive
from polymodal.nn.attention import Attention
from polymodal.nn.mlp import make_mlp
from polymodal.nn.norms import LayerNorm
from polymodal.nn.transformer import Block


@dataclass
class VisionConfig(Config):
    variant: str = "siglip"  # "siglip" | "clip"
    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072
    mlp: str = "gelu_tanh"  # "gelu_tanh" (SigLIP) | "quick_gelu" (CLIP) | "gelu"
    norm_eps: float = 1e-6
    pooling_head: bool = True  # SigLIP's MAP head (ignored by CLIP, which pools its class token)

    def __post_init__(self) -> None:
        _check_choice("variant", self.variant, ("siglip", "clip"))
        _check_choice("mlp", self.mlp, ("gelu_tanh", "quick_gelu", "gelu"))
        _check_positive(self, "image_size", "patch_size", "channels", "dim", "n_layers", "n_heads", "hidden_dim")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def encoder_blocks(dim: int, n_layers: int, n_heads: int, hidden_dim: int, mlp: str, eps: float) -> nn.ModuleList:
    """Pre-LN transformer encoder layers with biased projections (CLIP/SigLIP image and text towers)."""
    return nn.ModuleList(
        Block(Attention(dim, n_heads, bias=True), make_mlp(mlp, dim, hidden_dim, bias=True),
              LayerNorm(dim, eps), LayerNorm(dim, eps))
        for _ in range(n_layers)
    )


class AttentionPoolingHead(nn.Module):
    """SigLIP's MAP head: a learned probe attends over all patches, then a residual MLP."""

    def __init__(self, dim: int, n_heads: int, hidden_dim: int, mlp: str, eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, dim))
        self.attn = Attention(dim, n_heads, kv_dim=dim, bias=True)
        self.norm = LayerNorm(dim, eps)
        self.mlp = make_mlp(mlp, dim, hidden_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, dim) -> (B, dim)
        h = self.attn(self.probe.expand(x.shape[0], -1, -1), x)
        return (h + self.mlp(self.norm(h)))[:, 0]


@dataclass
class VisionOutput:
    features: torch.Tensor  # (B, N, dim): the selected layer's patch (and class) tokens
    pooled: torch.Tensor | None = None  # (B, dim)


class ViT(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        cfg = self.config = config
        clip = cfg.variant == "clip"
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=not clip)
        self.class_token = nn.Parameter(torch.randn(cfg.dim) * 0.02) if clip else None
        self.pos_embed = nn.Embedding(cfg.n_patches + int(clip), cfg.dim)
        self.pre_norm = LayerNorm(cfg.dim, cfg.norm_eps) if clip else None
        self.layers = encoder_blocks(cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden_dim, cfg.mlp, cfg.norm_eps)
        self.post_norm = LayerNorm(cfg.dim, cfg.norm_eps)
        self.head = (AttentionPoolingHead(cfg.dim, cfg.n_heads, cfg.hidden_dim, cfg.mlp, cfg.norm_eps)
                     if cfg.pooling_head and not clip else None)

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be (num_images, {', '.join(map(str, expected))}), "
                             f"got {tuple(pixel_values.shape)}")

    def forward(self, pixel_values: torch.Tensor, *, layer: int | None = None, pooled: bool = False) -> VisionOutput:
        """layer=None: the final features as HF's `last_hidden_state` (SigLIP post-normed, CLIP not);
        layer=k: the raw output of HF's `hidden_states[k]` (0 = embeddings, -2 = penultimate layer).
        pooled: also compute the pooled embedding (MAP head or CLIP class token)."""
        self.check_pixels(pixel_values)
        n = len(self.layers)
        stop = n if layer is None or pooled else range(n + 1)[layer]
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, dim)
        if self.class_token is not None:
            x = torch.cat((self.class_token.expand(x.shape[0], 1, -1).to(x.dtype), x), dim=1)
        x = x + self.pos_embed.weight
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        selected = x if layer is not None and range(n + 1)[layer] == 0 else None
        for i, block in enumerate(self.layers[:stop]):
            x = block(x)
            if layer is not None and range(n + 1)[layer] == i + 1:
                selected = x
        if self.class_token is None:
            x = self.post_norm(x)
            pool = self.head(x) if pooled and self.head is not None else None
        else:
            pool = self.post_norm(x[:, 0]) if pooled else None
        return VisionOutput(features=x if layer is None else selected, pooled=pool)
