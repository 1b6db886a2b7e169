"""Training on the built-in world's location tasks (`synthetic.LOCATION_TASKS`: detect, segment), for a family
whose spec says it answers with places (`FamilySpec.locations`): its tokenizer gets PaliGemma's 1,024 location
and 128 segmentation tokens, its config the world's small mask VQ-VAE (segment), which training fits first
(`vq_stage.fit_mask_vaes`), and the format codes the targets' masks with the model's fitted, frozen copy.

A user's JSONL asks the same of a fresh model when its targets hold objects (`asked_of`): detect for boxes, segment
too when an object has a mask. On the user's own masks the VAE is then the world path's, fitted to the training
masks, or the model's own or a file the user gives (`convert/mask_vae_file.py`); every checkpoint keeps it as
`vae-oid.npz` beside its weights or adapter (`write_mask_vae`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from polymodal.config import Config, ConfigError
from polymodal.data.collate import Collator
from polymodal.data.documents import Document, DocumentError
from polymodal.data.locations import add_location_tokens
from polymodal.data.synthetic import LOCATION_TASKS
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.mask_vae import MASK_VAE_FILE, MaskVAEConfig, mask_vae_npz, mask_vae_of
from polymodal.families import spec_of

# the world's masks are 32 pixels wide: a VAE of 82k parameters codes their crops in 16 codes (a 4x4 grid)
WORLD_MASK_VAE = MaskVAEConfig(mask_size=32, hidden_dim=8, n_down=3, n_res_blocks=1, codebook_dim=32)


def asked_of(config: Config, sources: Sequence[tuple[str, Sequence[Document]]]) -> tuple[str, ...]:
    """The location tasks that the documents of `sources` ((where from, documents), media unread) ask of a `config`
    model: detect when a target holds objects, segment too when one has masks; none of a family that writes boxes
    as text. Objects a family has no place for are refused, naming the line: masks where there are no location
    tokens, and any object for a dual encoder (it scores image-caption pairs, and writes nothing)."""
    spec, asked = spec_of(config), set()
    for source, docs in sources:
        for doc in docs:
            for s in doc.segments:
                if s.boxes is None:
                    continue
                masks = s.masks is not None or s.mask_sources is not None
                if spec.pairs or (masks and not spec.locations):
                    where = f"{source}, line {doc.line}" if doc.line is not None else source
                    raise DocumentError(f"{where}: {no_place_for(config, masks)}")
                asked.add("segment" if masks else "detect")
    return tuple(t for t in LOCATION_TASKS if t in asked) if spec.locations else ()


def no_place_for(config: Config, masks: bool) -> str:
    """Why a document's objects (with `masks` or not) cannot train a `config` model without location tokens."""
    name = type(config).__name__
    if spec_of(config).pairs:
        return (f"its target holds objects (boxes), which a {name} model (a dual encoder: it scores image-caption "
                "pairs and writes nothing) has no place for: train a family that answers with places (paligemma-tiny)")
    return (f"its objects have masks, which a {name} model has no place for (it writes boxes as text; a family that "
            "answers with places writes masks as segmentation tokens): leave the masks out")


def located(tasks: tuple[str, ...], config: Config, tokenizer: Tokenizer, fresh: bool) -> Config:
    """The model config for training on `tasks`, after giving the tokenizer the location tokens they need; a
    `fresh` model (neither resumed nor fine-tuned) gets the world's mask VQ-VAE when a task writes masks."""
    asked = [t for t in tasks if t in LOCATION_TASKS]
    if not asked:
        return config
    if not spec_of(config).locations:
        raise ConfigError(f"task {asked[0]} answers with location tokens; a {type(config).__name__} model writes none: "
                          "train a family that answers with places (paligemma-tiny)")
    add_location_tokens(tokenizer)
    if "segment" in asked and config.mask_vae is None:
        if not fresh:
            raise ConfigError("task segment answers with masks coded by a mask VQ-VAE; the model trained from has "
                              "none (its config's mask_vae is None)")
        config = config.replace(mask_vae=WORLD_MASK_VAE)
    return config


def share_mask_vae(model, collator: Collator) -> None:
    """Load the model's (fitted or resumed) mask VQ-VAE weights into the format's copy, which codes the targets'
    masks on the CPU as documents are read."""
    vae = mask_vae_of(model)
    if vae is None or collator.format.mask_vae is None:
        return
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()  # a DTensor under FSDP
             for k, v in vae.state_dict().items()}
    collator.format.mask_vae.load_state_dict(state)


def write_mask_vae(collator: Collator, directory: Path) -> None:
    """The mask VQ-VAE coding the run's masks (the format's copy of the model's: no gathering under FSDP), if it
    has one, as `vae-oid.npz` in `directory`: beside a checkpoint's weights, for `--mask-vae` and an HF export's
    reader, and beside a LoRA adapter, whose base directory may lack it."""
    if collator.format.mask_vae is not None:
        (directory / MASK_VAE_FILE).write_bytes(mask_vae_npz(collator.format.mask_vae))
