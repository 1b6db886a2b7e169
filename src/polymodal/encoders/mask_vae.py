"""PaliGemma's mask VQ-VAE (Beyer et al. 2024): a 64x64 instance mask <-> 16 codes from a 128-entry codebook.

The architecture and parameter names are those of the file big_vision's PaliGemma code reads,
`vae-oid.npz` (`big_vision/pp/proj/paligemma/segmentation.py` encodes with it,
`big_vision/evaluators/proj/paligemma/transfers/segmentation.py` decodes): the PyTorch VQ-VAE of AiT
(Ning et al. 2023, "All in Tokens", `vae/models/VQVAE.py` with hidden_dim 16, downsample_ratio 16,
codebook 128 x 512, two residual blocks). Its state-dict keys are the file's array names, so the file
loads as it is (`load_mask_vae`). Encoder: four stride-2 4x4 convs (1 -> 16 -> 32 -> 64 -> 128, each
then ReLU; TF's 'SAME' padding there is PyTorch's padding 1), two residual blocks, a 1x1 conv to the
codebook width; codes are the nearest codebook rows. Decoder: the mirror, with 4x4 stride-2 transposed
convs (128 -> 128 -> 64 -> 32 -> 16) and a 1x1 conv to one channel. A mask in [0, 1] is read as
2 * (m - 0.5); the decoder's output is a logit, > 0 inside the mask.

Shapes: B masks, S = mask_size (64), g = S / 2**n_down (4), N = g * g codes (16), K codebook size.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import Config, _check_positive
from polymodal.encoders.vq import fit_codes, lookup_codes, nearest_codes, quantize
from polymodal.errors import CheckpointError, ConfigError, InputError, MissingFileError, check_ids, check_media
from polymodal.weights import check_weight

# Arrays the official file may hold beside the weights: the EMA codebook's running statistics (AiT trains
# the codebook by EMA), which coding never reads.
EMA_ARRAYS = ("_vq_vae._ema_cluster_size", "_vq_vae._ema_w")
MASK_VAE_FILE = "vae-oid.npz"  # big_vision's name, which an HF export writes beside the weights (convert/hf_export.py)


@dataclass
class MaskVAEConfig(Config):
    """The defaults are the official `vae-oid.npz`; a smaller one suits a tiny world."""

    mask_size: int = 64
    hidden_dim: int = 16  # the first conv's width; each downsampling doubles it
    n_down: int = 4  # stride-2 convs: the code grid is mask_size / 2**n_down
    n_res_blocks: int = 2
    codebook_size: int = 128
    codebook_dim: int = 512
    beta: float = 0.25  # commitment loss weight, when training

    def __post_init__(self) -> None:
        _check_positive(self, "mask_size", "hidden_dim", "n_down", "n_res_blocks", "codebook_size", "codebook_dim",
                        "beta")
        if self.mask_size % 2 ** self.n_down:
            raise ConfigError(f"mask_size ({self.mask_size}) must be divisible by 2**n_down = {2 ** self.n_down}")

    @property
    def grid(self) -> int:
        return self.mask_size // 2 ** self.n_down

    @property
    def tokens_per_mask(self) -> int:
        return self.grid ** 2


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(conv3x3(x))))), at one width."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def _encoder(cfg: MaskVAEConfig) -> nn.Sequential:
    widths = [1] + [cfg.hidden_dim * 2 ** i for i in range(cfg.n_down)]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
    layers += [ResBlock(widths[-1]) for _ in range(cfg.n_res_blocks)]
    return nn.Sequential(*layers, nn.Conv2d(widths[-1], cfg.codebook_dim, 1))


def _decoder(cfg: MaskVAEConfig) -> nn.Sequential:
    top = cfg.hidden_dim * 2 ** (cfg.n_down - 1)
    widths = [top] + [top // 2 ** i for i in range(cfg.n_down)]  # the first upsampling keeps the width
    layers: list[nn.Module] = [nn.Conv2d(cfg.codebook_dim, top, 1), nn.ReLU()]
    layers += [ResBlock(top) for _ in range(cfg.n_res_blocks)]
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(widths[-1], 1, 1))


@dataclass
class MaskVAEOutput:
    logits: torch.Tensor  # (B, S, S) reconstruction, > 0 inside
    loss: torch.Tensor  # reconstruction MSE (in [-1, 1]) + codebook + commitment
    codes: torch.Tensor  # (B, N)


class MaskVAE(nn.Module):
    def __init__(self, config: MaskVAEConfig | None = None):
        super().__init__()
        cfg = self.config = config or MaskVAEConfig()
        self.encoder = _encoder(cfg)
        self.decoder = _decoder(cfg)
        self._vq_vae = nn.Module()  # the file's `_vq_vae._embedding`
        self._vq_vae._embedding = nn.Parameter(
            torch.empty(cfg.codebook_size, cfg.codebook_dim).uniform_(-1 / cfg.codebook_size, 1 / cfg.codebook_size))

    @property
    def codebook(self) -> torch.Tensor:  # (K, D)
        return self._vq_vae._embedding

    def _latents(self, masks: torch.Tensor) -> torch.Tensor:
        size = self.config.mask_size
        check_media("masks", masks, ("batch", size, size), "with values in [0, 1]")
        if masks.numel() and (masks.min() < 0 or masks.max() > 1):
            raise InputError(f"masks must hold values in [0, 1], got values in [{float(masks.min())}, "
                             f"{float(masks.max())}]")
        x = 2.0 * (masks.to(self.codebook.dtype)[:, None] - 0.5)
        return self.encoder(x)  # (B, D, g, g)

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """masks (B, S, S) in [0, 1] -> codes (B, N), row-major over the code grid."""
        return nearest_codes(self._latents(masks), self.codebook)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N) -> mask logits (B, S, S); > 0 is inside the mask."""
        cfg = self.config
        check_ids(codes, "codes")
        if codes.shape[1] != cfg.tokens_per_mask:
            raise InputError(f"codes must be (batch, {cfg.tokens_per_mask}), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= cfg.codebook_size):
            raise InputError(f"codes must be in [0, {cfg.codebook_size}), got values in [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        return self.decoder(lookup_codes(codes.long(), self.codebook, cfg.grid))[:, 0]

    def forward(self, masks: torch.Tensor) -> MaskVAEOutput:
        """Training: reconstruct masks (B, S, S) in [0, 1] through the straight-through codebook."""
        z = self._latents(masks)
        zq, codebook_loss, codes = quantize(z, self.codebook, self.config.beta)
        logits = self.decoder(zq)[:, 0]
        target = 2.0 * (masks.to(logits.dtype) - 0.5)
        return MaskVAEOutput(logits, F.mse_loss(logits, target) + codebook_loss, codes)


def mask_vae_of(model: nn.Module) -> MaskVAE | None:
    """The mask VQ-VAE a model holds (a world segment run's), or None."""
    return next((m for m in model.modules() if isinstance(m, MaskVAE)), None)


def train_mask_vae(model: MaskVAE, masks: torch.Tensor, *, steps: int, batch_size: int = 64, lr: float = 3e-3,
                   seed: int = 0, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Fit a mask VQ-VAE to masks (N, S, S) in [0, 1] as `encoders.vq.fit_codes` fits a VQ (codebook from the
    masks' latents, AdamW, one-cycle); returns the loss per step."""
    def latents(x: torch.Tensor) -> torch.Tensor:
        return model._latents(x).flatten(2).transpose(1, 2).reshape(-1, model.config.codebook_dim)

    return fit_codes(model, masks, latents, model.codebook, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                     on_step=on_step)


def expected_arrays(config: MaskVAEConfig) -> dict[str, tuple[int, ...]]:
    """Array name -> shape of a file for this config: the model's state-dict keys (read on the meta device)."""
    with torch.device("meta"):
        model = MaskVAE(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise MissingFileError(f"mask VQ-VAE file {path} does not exist (expected an .npz such as vae-oid.npz)")
    try:
        with np.load(path, allow_pickle=False) as npz:  # never unpickle a user's file
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} is not a readable .npz of plain arrays ({e})") from e


def config_of_arrays(arrays: dict[str, np.ndarray]) -> MaskVAEConfig:
    """The architecture an .npz of big_vision's layout holds, read from its arrays' names and shapes: the first
    conv's width, the stride-2 convs and residual blocks of the encoder, the codebook's width; 16 codes from 128
    entries, as PaliGemma writes them (so the mask is 4 * 2**n_down wide). What the arrays do not say is the
    official file's, so that a damaged file is refused by `load_mask_vae` naming the array."""
    default = MaskVAEConfig()
    convs = [a for name, a in arrays.items() if re.fullmatch(r"encoder\.\d+\.weight", name) and a.ndim == 4
             and a.shape[-2:] == (4, 4)]
    blocks = {name.split(".")[1] for name in arrays if re.fullmatch(r"encoder\.\d+\.net\.0\.weight", name)}
    first, codebook = arrays.get("encoder.0.weight"), arrays.get("_vq_vae._embedding")
    n_down = len(convs) or default.n_down
    return MaskVAEConfig(mask_size=4 * 2 ** n_down, n_down=n_down, n_res_blocks=len(blocks) or default.n_res_blocks,
                         hidden_dim=first.shape[0] if first is not None and first.ndim == 4 else default.hidden_dim,
                         codebook_dim=codebook.shape[1] if codebook is not None and codebook.ndim == 2
                         else default.codebook_dim)


def mask_vae_npz(vae: MaskVAE) -> bytes:
    """The VAE's weights as an .npz of big_vision's layout (float32 arrays named as `vae-oid.npz` names them),
    which `load_mask_vae` reads back."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: t.detach().float().cpu().numpy() for name, t in vae.state_dict().items()})
    return buffer.getvalue()


def load_mask_vae(path: str | Path, config: MaskVAEConfig | None = None) -> MaskVAE:
    """The mask VQ-VAE in an .npz of big_vision's layout (the official `vae-oid.npz`, or one `mask_vae_npz`
    wrote), of `config`, by default the architecture its arrays describe (`config_of_arrays`).

    Every array the config needs must be there with its shape and finite values, and nothing else but the EMA
    statistics; otherwise a CheckpointError names what is missing, misshapen, non-finite or unknown."""
    path = Path(path)
    arrays = _read_npz(path)
    config = config or config_of_arrays(arrays)
    expected = expected_arrays(config)
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} array(s) of the mask VQ-VAE: {missing[:6]}"
                              f"{' ...' if len(missing) > 6 else ''}")
    unknown = sorted(set(arrays) - set(expected) - set(EMA_ARRAYS))
    if unknown:
        raise CheckpointError(f"{path} holds array(s) no mask VQ-VAE of this config has: {unknown[:6]}")
    for name, shape in expected.items():
        array = arrays[name]
        if array.shape != shape or not np.issubdtype(array.dtype, np.floating):
            raise CheckpointError(f"{path}: array {name} must be a float array of shape {shape}, got "
                                  f"{array.dtype} {array.shape}")
    state = {name: torch.from_numpy(arrays[name]).float() for name in expected}
    for name, tensor in state.items():  # a NaN would decode every mask as NaN, a float64 1e300 as inf
        check_weight(tensor, name, path)
    model = MaskVAE(config)
    model.load_state_dict(state)
    return model.eval()
