"""One Vision Transformer (Dosovitskiy et al. 2020) for CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023).

CLIP: class token, bias-free patch embedding, LayerNorm before the encoder, quick-GELU, pooled =
post-LN of the class token. SigLIP: no class token, GELU-tanh, post-LN over all patches, pooled by
a multihead attention-pooling (MAP) head. Matches HF `CLIPVisionModel` and `SiglipVisionModel`.
The encoder stack (`encoder_blocks`, run with `mask=None` for images) is shared with the text towers.
Other image sizes (PaliGemma's 448 and 896 from 224 weights) interpolate the position embeddings as HF's
`interpolate_pos_encoding` does (bicubic, align_corners=False, in the weights' dtype): at run time
(`forward(..., interpolate_pos_encoding=True)`) or once, on loading (`resize_position_embeddings`).

Shapes: B images, N tokens (patches, plus the class token for CLIP), D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import Config, _check_choice, _check_positive
from polymodal.errors import CheckpointError, ConfigError, InputError, check_media, check_pixel_values
from polymodal.nn.attention import Attention
from polymodal.nn.mlp import make_mlp
from polymodal.nn.norms import LayerNorm
from polymodal.nn.transformer import Block

# What HF's CLIPVisionConfig / SiglipVisionConfig default to, so a config that leaves these out means the same here.
VARIANT_DEFAULTS = {"siglip": {"mlp": "gelu_tanh", "norm_eps": 1e-6, "pooling_head": True},
                    "clip": {"mlp": "quick_gelu", "norm_eps": 1e-5, "pooling_head": False}}


def check_encoder_config(cfg: Config, *positive: str) -> None:
    """What the image and text towers' configs check alike; `positive`: more fields that must be > 0."""
    _check_choice("variant", cfg.variant, tuple(VARIANT_DEFAULTS))
    _check_choice("mlp", cfg.mlp, ("gelu_tanh", "quick_gelu", "gelu"))
    _check_positive(cfg, *positive, "dim", "n_layers", "n_heads", "hidden_dim", "norm_eps")
    if cfg.dim % cfg.n_heads:
        raise ConfigError(f"dim ({cfg.dim}) must be divisible by n_heads ({cfg.n_heads})")


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
    mlp: str | None = None  # None: the variant's ("gelu_tanh" SigLIP, "quick_gelu" CLIP); or "gelu"
    norm_eps: float | None = None  # None: the variant's (1e-6 SigLIP, 1e-5 CLIP)
    pooling_head: bool | None = None  # SigLIP's MAP head (None: SigLIP has one; CLIP pools its class token)

    def __post_init__(self) -> None:
        for name, value in VARIANT_DEFAULTS.get(self.variant, {}).items():  # an unknown variant fails the check
            if getattr(self, name) is None:
                setattr(self, name, value)
        check_encoder_config(self, "image_size", "patch_size", "channels")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.variant == "clip" and self.pooling_head:
            raise ConfigError("CLIP has no attention-pooling head (it pools its class token); set pooling_head=False")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def encoder_blocks(dim: int, n_layers: int, n_heads: int, hidden_dim: int, mlp: str, eps: float) -> nn.ModuleList:
    """Pre-LN transformer encoder layers with biased projections (CLIP/SigLIP image and text towers).
    Each is a `Block`: call it as `block(x, mask=...)`; images pass no mask (full attention)."""
    return nn.ModuleList(
        Block(Attention(dim, n_heads, bias=True), make_mlp(mlp, dim, hidden_dim, bias=True),
              LayerNorm(dim, eps), LayerNorm(dim, eps))
        for _ in range(n_layers)
    )


def init_weights(module: nn.Module) -> None:
    """timm/BERT-style N(0, 0.02) for training from scratch; `ViT.init_embeddings` then follows the
    references. PyTorch's default N(0, 1) position embeddings drown the patches: a tiny PaliGemma then
    ignores its images at lr 2e-3."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, AttentionPoolingHead):
        nn.init.normal_(module.probe, std=0.02)


class AttentionPoolingHead(nn.Module):
    """SigLIP's MAP head: a learned probe attends over all patches, then a residual MLP."""

    def __init__(self, dim: int, n_heads: int, hidden_dim: int, mlp: str, eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, dim))
        self.attn = Attention(dim, n_heads, kv_dim=dim, bias=True)
        self.norm = LayerNorm(dim, eps)
        self.mlp = make_mlp(mlp, dim, hidden_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, D)
        h = self.attn(self.probe.expand(x.shape[0], -1, -1), x)  # (B, 1, D)
        return (h + self.mlp(self.norm(h)))[:, 0]


def interpolate_positions(weight: torch.Tensor, grid: tuple[int, int], class_token: bool = False) -> torch.Tensor:
    """Position embeddings (n_class + s*s, D) of an s x s patch grid -> those of a (rows, cols) grid: the patch
    part resized bicubically (align_corners=False) in its own dtype, CLIP's class position kept, as HF's
    `interpolate_pos_encoding`; unchanged, as there, when the grid is square and of the same count."""
    n_class = int(class_token)
    patches, dim = weight[n_class:], weight.shape[-1]
    side = int(patches.shape[0] ** 0.5)
    if side * side != patches.shape[0]:
        raise ConfigError(f"position embeddings of {patches.shape[0]} patches are no square grid to interpolate")
    if grid[0] == grid[1] and grid[0] * grid[1] == patches.shape[0]:
        return weight
    square = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, s, s)
    resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
    return torch.cat((weight[:n_class], resized.permute(0, 2, 3, 1).reshape(-1, dim)))


def resize_position_embeddings(state_dict: dict[str, torch.Tensor], config: VisionConfig,
                               prefix: str = "") -> dict[str, torch.Tensor]:
    """A ViT state dict whose position embeddings were trained at another image size (PaliGemma's 224) ->
    one that loads into a ViT of `config` (448, 896): `{prefix}pos_embed.weight` interpolated to its grid."""
    key = f"{prefix}pos_embed.weight"
    if key not in state_dict:
        raise CheckpointError(f"no {key} in the state dict to resize (keys start {sorted(state_dict)[:3]})")
    side = config.image_size // config.patch_size
    resized = interpolate_positions(state_dict[key], (side, side), class_token=config.variant == "clip")
    return {**state_dict, key: resized}


@dataclass
class VisionOutput:
    features: torch.Tensor  # (B, N, D): the selected layer's tokens
    pooled: torch.Tensor | None = None  # (B, D)


class ViT(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        cfg = self.config = config
        clip = cfg.variant == "clip"
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=not clip)
        self.class_token = nn.Parameter(torch.empty(cfg.dim)) if clip else None
        self.pos_embed = nn.Embedding(cfg.n_patches + int(clip), cfg.dim)
        self.pre_norm = LayerNorm(cfg.dim, cfg.norm_eps) if clip else None
        self.layers = encoder_blocks(cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden_dim, cfg.mlp, cfg.norm_eps)
        self.post_norm = LayerNorm(cfg.dim, cfg.norm_eps)
        self.head = (AttentionPoolingHead(cfg.dim, cfg.n_heads, cfg.hidden_dim, cfg.mlp, cfg.norm_eps)
                     if cfg.pooling_head else None)
        self.apply(init_weights)
        self.init_embeddings()

    def init_embeddings(self) -> None:
        """As the references start them (HF `CLIPPreTrainedModel` / `SiglipPreTrainedModel._init_weights`):
        CLIP patches and positions std 0.02 (`init_weights`), class token std 1/sqrt(dim); SigLIP
        (big_vision) patches LeCun-normal, positions std 1/sqrt(dim)."""
        std = self.config.dim ** -0.5
        if self.class_token is not None:  # CLIP
            nn.init.normal_(self.class_token, std=std)
        else:  # SigLIP
            nn.init.normal_(self.pos_embed.weight, std=std)
            w = self.patch_embed.weight
            # a unit normal cut at +-2 has std 0.88: dividing by it keeps the variance at 1/fan_in
            lecun = (w[0].numel() ** -0.5) / 0.87962566103423978
            nn.init.trunc_normal_(w, std=lecun, a=-2 * lecun, b=2 * lecun)

    def check_pixels(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> None:
        """The config's square size; any multiple of the patch size when the positions are interpolated."""
        cfg = self.config
        if not interpolate_pos_encoding:
            return check_pixel_values(pixel_values, cfg.channels, cfg.image_size)
        check_media("pixel_values", pixel_values, ("num_images", cfg.channels, "height", "width"))
        height, width = pixel_values.shape[-2:]
        if height % cfg.patch_size or width % cfg.patch_size or not height or not width:
            raise InputError(f"pixel_values' height and width must be positive multiples of the patch size "
                             f"({cfg.patch_size}) to interpolate positions, got {height}x{width}")

    def embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D): patches (+ class token) + positions (+ CLIP's pre-LN)."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (B, D, rows, cols)
        positions = self.pos_embed.weight
        if interpolate_pos_encoding:
            positions = interpolate_positions(positions, tuple(x.shape[-2:]), self.class_token is not None)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        if self.class_token is not None:
            x = torch.cat((self.class_token.to(x.dtype).expand(x.shape[0], 1, -1), x), dim=1)
        x = x + positions
        return self.pre_norm(x) if self.pre_norm is not None else x

    def forward(self, pixel_values: torch.Tensor, *, layer: int | None = None, pooled: bool = False,
                interpolate_pos_encoding: bool = False) -> VisionOutput:
        """features: layer=None gives HF's `last_hidden_state` (SigLIP post-normed; CLIP not, its post-LN
        is for the class token only); layer=k gives HF's `hidden_states[k]` (0 = embeddings, -1 = last
        block, -2 = the penultimate layer LLaVA-style VLMs read), computing no block past it.
        pooled: also the pooled embedding (SigLIP's MAP head, CLIP's post-normed class token).
        interpolate_pos_encoding: read images of another size (HF's flag of that name)."""
        n = len(self.layers)
        if layer is not None and not -n - 1 <= layer <= n:
            raise ConfigError(f"layer must be in [{-n - 1}, {n}] for a ViT of {n} blocks (0 = embeddings), got {layer}")
        if pooled and self.config.variant == "siglip" and self.head is None:
            raise ConfigError("this SigLIP has no pooling head (pooling_head=False), so it has no pooled output")
        self.check_pixels(pixel_values, interpolate_pos_encoding)
        select = n if layer is None else layer % (n + 1)
        x = self.embed(pixel_values, interpolate_pos_encoding)
        features = x
        for i, block in enumerate(self.layers[: n if pooled else select]):
            x = block(x)  # no mask: every patch sees every patch
            if i + 1 == select:
                features = x
        if self.class_token is not None:  # CLIP
            return VisionOutput(features, self.post_norm(x[:, 0]) if pooled else None)
        if layer is None or pooled:
            x = self.post_norm(x)
        return VisionOutput(x if layer is None else features, self.head(x) if pooled else None)
