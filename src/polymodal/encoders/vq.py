"""VQ image tokenizer: the VQGAN of Esser et al. 2021 (taming-transformers) as Chameleon uses it.

A conv encoder (ResNet blocks, strided-conv downsampling, optional self-attention) maps an image in
[-1, 1] to a grid of latents; each latent snaps to its nearest codebook vector (van den Oord et al.
2017: straight-through gradients, codebook + beta * commitment loss); a conv decoder (the mirror,
with nearest-neighbour upsampling) turns a grid of codes back into pixels.

Encoder, quantizer and the 1x1 `quant_conv` / `post_quant_conv` match HF `ChameleonVQVAE` key for key.
HF has no decoder for Chameleon's VQ (its checkpoints drop it); ours has the VQGAN decoder layout of HF
`JanusVQVAEDecoder` (blocks applied in `up[0], up[1], ...` order), which the tests match numerically.

Shapes: B images, C channels, H x W pixels, h x w latent grid (h = H / 2**(levels - 1)), N = h * w codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import PIL.Image
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import Config, _check_positive
from polymodal.errors import ConfigError, check_pixel_values
from polymodal.nn.attention import attend


@dataclass
class VQConfig(Config):
    resolution: int = 32  # image side in pixels (square images)
    in_channels: int = 3
    base_channels: int = 32
    channel_multiplier: list[int] = field(default_factory=lambda: [1, 2, 2])  # per level; all but the last halve
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=list)  # feature-map sides that get self-attention
    mid_attn: bool = True  # self-attention between the middle ResNet blocks (HF attn_type "vanilla")
    latent_channels: int = 64
    embed_dim: int = 64  # codebook vector width
    num_embeddings: int = 256  # codebook size
    beta: float = 0.25  # commitment loss weight
    norm_groups: int = 32  # GroupNorm groups (HF: 32)
    dropout: float = 0.0
    decoder: bool = True  # False: encode only (HF Chameleon checkpoints carry no decoder)

    def __post_init__(self) -> None:
        _check_positive(self, "resolution", "in_channels", "base_channels", "num_res_blocks", "latent_channels",
                        "embed_dim", "num_embeddings", "norm_groups")
        if not self.channel_multiplier or min(self.channel_multiplier) <= 0:
            raise ConfigError(f"channel_multiplier needs positive entries, got {self.channel_multiplier}")
        if self.resolution % 2 ** (len(self.channel_multiplier) - 1):
            raise ConfigError(f"resolution ({self.resolution}) must be divisible by 2**(levels - 1) = "
                              f"{2 ** (len(self.channel_multiplier) - 1)}")
        widths = [self.base_channels * m for m in (1, *self.channel_multiplier)]
        if any(w % self.norm_groups for w in widths):
            raise ConfigError(f"every width {widths} must be divisible by norm_groups ({self.norm_groups})")

    @property
    def grid(self) -> int:
        """Side of the latent grid."""
        return self.resolution // 2 ** (len(self.channel_multiplier) - 1)

    @property
    def tokens_per_image(self) -> int:
        return self.grid**2


def _norm(cfg: VQConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VQConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(cfg, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(cfg, out_channels)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1 convs for q, k, v and the output."""

    def __init__(self, cfg: VQConfig, channels: int):
        super().__init__()
        self.norm = _norm(cfg, channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))  # (B, 1, hw, C)
        y = attend(q, k, v)[:, 0].transpose(1, 2).reshape(x.shape)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    return level


def _mid(cfg: VQConfig, channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(cfg, channels, channels)
    mid.attn_1 = AttnBlock(cfg, channels) if cfg.mid_attn else nn.Identity()
    mid.block_2 = ResnetBlock(cfg, channels, channels)
    return mid


def _run_level(level: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        x = block(x)
        if len(level.attn):
            x = level.attn[i](x)
    return x


class VQEncoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult = (1, *cfg.channel_multiplier)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        res = cfg.resolution
        for i in range(len(cfg.channel_multiplier)):
            c_in, c_out = cfg.base_channels * mult[i], cfg.base_channels * mult[i + 1]
            blocks = [ResnetBlock(cfg, c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(cfg, c_out) for _ in blocks] if res in cfg.attn_resolutions else []
            level = _level(blocks, attns)
            if i < len(cfg.channel_multiplier) - 1:
                level.downsample = Downsample(c_out)
                res //= 2
            self.down.append(level)
        self.mid = _mid(cfg, c_out)
        self.norm_out = _norm(cfg, c_out)
        self.conv_out = nn.Conv2d(c_out, cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, latent, h, w)
        x = self.conv_in(x)
        for level in self.down:
            x = _run_level(level, x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        x = self.mid.block_2(self.mid.attn_1(self.mid.block_1(x)))
        return self.conv_out(F.silu(self.norm_out(x)))


class VQDecoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_multiplier]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, c, 3, padding=1)
        self.mid = _mid(cfg, c)
        self.up = nn.ModuleList()
        res = cfg.grid
        for i in reversed(range(len(widths))):  # lowest resolution first
            blocks = [ResnetBlock(cfg, c if j == 0 else widths[i], widths[i]) for j in range(cfg.num_res_blocks + 1)]
            c = widths[i]
            attns = [AttnBlock(cfg, c) for _ in blocks] if res in cfg.attn_resolutions else []
            level = _level(blocks, attns)
            if i > 0:
                level.upsample = Upsample(c)
                res *= 2
            self.up.append(level)
        self.norm_out = _norm(cfg, c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, latent, h, w) -> (B, 3, H, W)
        x = self.conv_in(z)
        x = self.mid.block_2(self.mid.attn_1(self.mid.block_1(x)))
        for level in self.up:
            x = _run_level(level, x)
            if hasattr(level, "upsample"):
                x = level.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """z (B, D, h, w), codebook (K, D) -> the nearest code per position (B, h*w), row-major."""
    flat = z.flatten(2).transpose(1, 2).reshape(-1, z.shape[1])  # (B*h*w, D)
    # ||z - e||^2 expanded as HF and big_vision compute it, so ties and rounding pick the same codes
    dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
    return dist.argmin(1).view(z.shape[0], -1)


def lookup_codes(codes: torch.Tensor, codebook: torch.Tensor, grid: int) -> torch.Tensor:
    """codes (B, h*w) -> codebook vectors (B, D, h, w) on a square grid."""
    return F.embedding(codes, codebook).transpose(1, 2).unflatten(2, (grid, grid))


def quantize(z: torch.Tensor, codebook: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (B, D, h, w) -> straight-through quantised z, codebook + beta * commitment loss, codes (B, h*w)."""
    codes = nearest_codes(z, codebook)
    zq = lookup_codes(codes, codebook, z.shape[-1])
    loss = F.mse_loss(zq, z.detach()) + beta * F.mse_loss(z, zq.detach())
    return z + (zq - z).detach(), loss, codes


class VectorQuantizer(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, beta: float):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)
        self.beta = beta

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D, h, w) -> nearest code per position (B, h*w)."""
        return nearest_codes(z, self.embedding.weight)

    def lookup(self, codes: torch.Tensor, grid: int) -> torch.Tensor:
        """codes (B, h*w) -> codebook vectors (B, D, h, w)."""
        return lookup_codes(codes, self.embedding.weight, grid)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> straight-through quantised z, codebook + commitment loss, codes (B, h*w)."""
        return quantize(z, self.embedding.weight, self.beta)


@dataclass
class VQOutput:
    pixels: torch.Tensor  # (B, 3, H, W) reconstruction
    loss: torch.Tensor  # reconstruction MSE + codebook + commitment
    codes: torch.Tensor  # (B, N)


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        cfg = self.config = config
        self.encoder = VQEncoder(cfg)
        self.quantize = VectorQuantizer(cfg.num_embeddings, cfg.embed_dim, cfg.beta)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        self.decoder = VQDecoder(cfg) if cfg.decoder else None

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> codes (B, N), row-major over the latent grid."""
        check_pixel_values(pixels, self.config.in_channels, self.config.resolution, "batch")
        return self.quantize.codes(self.quant_conv(self.encoder(pixels.to(self.quant_conv.weight.dtype))))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N) -> pixels (B, 3, H, W), about [-1, 1] (unclamped)."""
        cfg = self.config
        if self.decoder is None:
            raise ConfigError("this VQ model has no decoder (VQConfig.decoder=False; HF Chameleon checkpoints "
                             "carry none), so it cannot turn codes into pixels")
        if codes.dim() != 2 or codes.shape[1] != cfg.tokens_per_image:
            raise ConfigError(f"codes must be (batch, {cfg.tokens_per_image}), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= cfg.num_embeddings):
            raise ConfigError(f"codes must be in [0, {cfg.num_embeddings}), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes, cfg.grid)))

    def forward(self, pixels: torch.Tensor) -> VQOutput:
        check_pixel_values(pixels, self.config.in_channels, self.config.resolution, "batch")
        if self.decoder is None:
            raise ConfigError("training a VQ model needs its decoder (VQConfig.decoder=True)")
        zq, codebook_loss, codes = self.quantize(self.quant_conv(self.encoder(pixels)))
        recon = self.decoder(self.post_quant_conv(zq))
        return VQOutput(recon, F.mse_loss(recon, pixels) + codebook_loss, codes)


def pixels_to_images(pixels: torch.Tensor) -> list[PIL.Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images (clamped, rounded)."""
    rgb = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [PIL.Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).cpu().numpy())) for x in rgb]


def train_vq(model: VQModel, pixels: torch.Tensor, *, steps: int, batch_size: int = 16, lr: float = 5e-3,
             seed: int = 0, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Fit a VQ model to images (N, 3, H, W) in [-1, 1] with AdamW; returns the loss per step.

    The codebook starts from encoder outputs of up to 256 of the images (data-dependent init), so no
    code starts far from every latent and dies unused; one-cycle schedule, as many small steps beat
    a few big ones here. A VQ frozen inside a model (Chameleon) is trained
    all the same and left frozen."""
    def latents(x: torch.Tensor) -> torch.Tensor:
        return model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, model.config.embed_dim)

    return fit_codes(model, pixels, latents, model.quantize.embedding.weight, steps=steps, batch_size=batch_size,
                     lr=lr, seed=seed, on_step=on_step)


def fit_codes(model: nn.Module, data: torch.Tensor, latents: Callable[[torch.Tensor], torch.Tensor],
              codebook: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int,
              on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """The fitting loop of a VQ model (`model(batch).loss` on random batches of `data`): its codebook (K, D)
    first set to latents (M, D) of up to 256 examples, then AdamW with a one-cycle schedule; parameters frozen
    before stay frozen, and the model is left in eval mode. Returns the loss per step; `on_step(done, loss)`."""
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.requires_grad_(True).train()
    with torch.no_grad():
        z = latents(data[:256])
        pick = torch.randint(len(z), (len(codebook),), generator=generator)
        codebook.copy_(z[pick])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    for _ in range(steps):
        batch = data[torch.randint(len(data), (batch_size,), generator=generator)]
        loss = model(batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:  # progress: (steps done, this step's loss)
            on_step(len(losses), losses[-1])
    for p in frozen:
        p.requires_grad_(False)
    model.eval()
    return losses
