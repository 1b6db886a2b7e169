"""A VQ image tokenizer trained once per test session on the built-in world, shared by the VQ
reconstruction test and the text->image test (training it is the slow part of both)."""

import time
from dataclasses import dataclass

import pytest
import torch

from polymodal.data.synthetic import World
from polymodal.data.processors import images_to_pixels
from polymodal.encoders.vq import VQModel, train_vq
from polymodal.families.chameleon.presets import chameleon_tiny

WORLD = World(seed=0)


def world_images(split: str, n: int) -> torch.Tensor:
    """(N, 3, 32, 32) in [-1, 1]: the images of n examples of the world's scenes and text->image targets."""
    tasks = ("caption", "count", "text_to_image")
    found = [s.media for ex in WORLD.examples(split, tasks, n) for s in ex.document.segments if s.kind == "image"]
    return images_to_pixels(found, 32)


@dataclass
class TrainedVQ:
    model: VQModel
    train_pixels: torch.Tensor  # what it was fitted to
    losses: list[float]
    seconds: float


@pytest.fixture(scope="session")
def world_vq() -> TrainedVQ:
    """chameleon-tiny's VQ (8x8 codes from 128 per 32x32 image) fitted to 1500 training images."""
    torch.manual_seed(0)
    vq = VQModel(chameleon_tiny().vq)
    pixels = world_images("train", 1500)
    start = time.perf_counter()
    losses = train_vq(vq, pixels, steps=400, batch_size=16, lr=5e-3)
    return TrainedVQ(vq, pixels, losses, time.perf_counter() - start)
