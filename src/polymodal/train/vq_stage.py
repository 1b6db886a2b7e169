"""The first stage of training a model that writes images or masks as tokens: its VQ image tokenizer (or mask
VQ-VAE) is fitted to the training documents' images (or object masks) before the decoder trains, then frozen, as
the Chameleon paper trains its tokenizer on its own first (Chameleon Team 2024, section 2.1) and PaliGemma uses a
mask VQ-VAE trained apart (Beyer et al. 2024, from AiT, Ning et al. 2023). The decoder then learns
to write the frozen codes; the weights are saved in the model's checkpoints like every other weight, so a
resumed run skips this stage.
"""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import torch
from torch import nn

from polymodal.data.documents import Document
from polymodal.data.locations import crop_mask
from polymodal.data.processors import images_to_pixels
from polymodal.encoders.mask_vae import MaskVAE, train_mask_vae
from polymodal.encoders.vq import VQModel, train_vq
from polymodal.progress import Progress

VQ_IMAGES = 1500  # training images the tokenizer is fitted to (the VQ test's budget)
VQ_DOCS = 6000  # training documents searched for them
MASKS = 2000  # training object masks the mask VQ-VAE is fitted to


def fit_image_tokenizers(model: nn.Module, documents: Callable[[int], Document], steps: int, seed: int,
                         say: Callable[[str], None], show_progress: bool = True, n_docs: int = VQ_DOCS) -> None:
    """Fit every VQ tokenizer of `model` to the images of the first training documents (`documents(i)`, up to
    `n_docs`: a file's epoch, not its repeats), input and target images alike, for `steps` AdamW steps, with a progress bar (`polymodal/progress.py`) when
    `show_progress`. A model without one is left as it is."""
    tokenizers = [m for m in model.modules() if isinstance(m, VQModel)]
    if not tokenizers:
        return
    images = _first(documents, VQ_IMAGES, n_docs, lambda doc: [s.media for s in doc.segments
                                                       if s.kind == "image" and s.media is not None])
    if not images:
        say(f"no images in the first {min(n_docs, VQ_DOCS)} training documents: the VQ image tokenizer stays as built")
        return
    for vq in tokenizers:
        _fit("VQ image tokenizer", train_vq, vq, images_to_pixels(images, vq.config.resolution), steps, seed, say,
             show_progress, "training images")


def fit_mask_vaes(model: nn.Module, documents: Callable[[int], Document], steps: int, seed: int,
                  say: Callable[[str], None], show_progress: bool = True, n_docs: int = VQ_DOCS) -> None:
    """Fit every mask VQ-VAE of `model` to the object masks of the first training documents (up to `n_docs`),
    each cropped to its
    box and resized as big_vision codes it (`data.locations.crop_mask`), then leave it frozen. A model without
    one is left as it is."""
    vaes = [m for m in model.modules() if isinstance(m, MaskVAE)]
    if not vaes:
        return
    masks = _first(documents, MASKS, n_docs, lambda doc: [(m, box) for s in doc.segments if s.masks is not None
                                                  for m, (_, box) in zip(s.masks, s.boxes)])
    if not masks:
        say(f"no masks in the first {min(n_docs, VQ_DOCS)} training documents: the mask VQ-VAE stays as built")
        return
    for vae in vaes:
        crops = torch.stack([crop_mask(torch.from_numpy(np.asarray(m) > 127), box, vae.config.mask_size)
                             for m, box in masks])
        _fit("mask VQ-VAE", train_mask_vae, vae, crops, steps, seed, say, show_progress, "training masks")
        vae.requires_grad_(False)


def _first(documents: Callable[[int], Document], n: int, n_docs: int, items: Callable[[Document], list]) -> list:
    """Up to n items (`items(doc)`) of the first n_docs (at most VQ_DOCS) documents."""
    out: list = []
    for i in range(min(n_docs, VQ_DOCS)):
        out += items(documents(i))
        if len(out) >= n:
            break
    return out[:n]


def _fit(name: str, fit: Callable, module: nn.Module, data: torch.Tensor, steps: int, seed: int,
         say: Callable[[str], None], show_progress: bool, what: str) -> None:
    torch.manual_seed(seed)
    progress = Progress(steps, name, sys.stdout) if show_progress else None  # in the training log
    losses = fit(module, data, steps=steps, seed=seed,
                 on_step=progress and (lambda done, loss: progress.update(done - progress.done, f"loss {loss:.4f}")))
    if progress:
        progress.close()
    say(f"{name} fitted to {len(data)} {what} in {steps} steps: loss {losses[-1]:.4f}")
