"""A PaliGemma's mask VQ-VAE (Beyer et al. 2024) in a file of its own beside the weights: big_vision's
`vae-oid.npz`, which HF's PaliGemma has no place for. `hf_export.export_hf` writes a model's VAE there;
`found_mask_vae` joins that file to a model loaded from its directory (`pm.from_pretrained`, `polymodal convert
--to polymodal`), and `with_mask_vae` one the user gives (`polymodal train --mask-vae`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from polymodal.config import Config, ConfigError
from polymodal.encoders.mask_vae import MASK_VAE_FILE, MaskVAE, load_mask_vae, mask_vae_of
from polymodal.families import spec_of
from polymodal.nn.meta import empty


def given_mask_vae(config: Config, vae: MaskVAE) -> Config:
    """The config of a model (of a family that answers with places, holding no mask VQ-VAE) given `vae`."""
    if not spec_of(config).locations:
        raise ConfigError(f"a mask VQ-VAE codes masks as segmentation tokens; a {type(config).__name__} model writes "
                          "none: give a family that answers with places (PaliGemma)")
    if config.mask_vae is not None:
        raise ConfigError("the model holds a mask VQ-VAE of its own, whose codes it learned to write; leave out the "
                          "mask VQ-VAE file")
    return config.replace(mask_vae=vae.config)


def with_mask_vae(model: nn.Module, vae: MaskVAE) -> nn.Module:
    """`model` with `vae` (frozen, on the model's device) put where its family holds one and its config saying so
    (`given_mask_vae`): in place, nothing else rebuilt or copied, so a quantized model takes one too."""
    config = given_mask_vae(model.config, vae)
    holder = empty(lambda: spec_of(config).model(config))
    path = next(name for name, m in holder.named_modules() if isinstance(m, MaskVAE))
    parent, _, attribute = path.rpartition(".")
    device = next(model.parameters()).device
    setattr(model.get_submodule(parent), attribute, vae.to(device).requires_grad_(False).train(model.training))
    model.config = config
    return model


def found_mask_vae(model: nn.Module, directory: str | Path) -> nn.Module:
    """`model`, loaded from the checkpoint `directory`, with that directory's own `vae-oid.npz` (an HF export's, a
    LoRA run's) when it holds no mask VQ-VAE; as it is otherwise."""
    own = Path(directory) / MASK_VAE_FILE
    if own.is_file() and spec_of(model.config).locations and mask_vae_of(model) is None:
        return with_mask_vae(model, load_mask_vae(own))
    return model
