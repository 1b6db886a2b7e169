"""The first stage of training a model that writes images as tokens: its VQ image tokenizer is fitted to the
training documents' images before the decoder trains, then frozen, as the Chameleon paper trains its tokenizer
on its own first (Chameleon Team 2024, section 2.1). The decoder then learns
to write the frozen codes; the VQ weights are saved in the model's checkpoints like every other weight.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn

from polymodal.data.documents import Document
from polymodal.data.processors import images_to_pixels
from polymodal.encoders.vq import VQModel, train_vq
from polymodal.progress import Progress

VQ_IMAGES = 1500  # training images the tokenizer is fitted to (the VQ test's budget)
VQ_DOCS = 6000  # training documents searched for them


def fit_image_tokenizers(model: nn.Module, documents: Callable[[int], Document], steps: int, seed: int,
                         say: Callable[[str], None], show_progress: bool = True) -> None:
    """Fit every VQ tokenizer of `model` to the images of the first training documents (`documents(i)`),
    input and target images alike, for `steps` AdamW steps, with a progress bar (`polymodal/progress.py`) when
    `show_progress`. A model without one is left as it is."""
    tokenizers = [m for m in model.modules() if isinstance(m, VQModel)]
    if not tokenizers:
        return
    images = []
    for i in range(VQ_DOCS):
        images += [s.media for s in documents(i).segments if s.kind == "image" and s.media is not None]
        if len(images) >= VQ_IMAGES:
            break
    if not images:
        say(f"no images in the first {VQ_DOCS} training documents: the VQ image tokenizer stays as built")
        return
    for vq in tokenizers:
        pixels = images_to_pixels(images[:VQ_IMAGES], vq.config.resolution)
        torch.manual_seed(seed)
        progress = Progress(steps, "VQ image tokenizer", sys.stdout) if show_progress else None  # in the training log
        losses = train_vq(vq, pixels, steps=steps, seed=seed,
                          on_step=progress and (lambda done, loss: progress.update(done - progress.done, f"loss {loss:.4f}")))
        if progress:
            progress.close()
        say(f"VQ image tokenizer fitted to {len(pixels)} training images in {steps} steps: loss {losses[-1]:.4f}")
