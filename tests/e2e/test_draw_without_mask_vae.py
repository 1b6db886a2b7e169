"""`polymodal generate --draw` on a segmentation answer from a model that holds no mask VQ-VAE, none given by
--mask-vae (the real CLI, a checkpoint whose greedy answer is set by hand: tests/scripted_paligemma.py): the boxes are
printed and drawn, and stderr says the masks were skipped and how to get them; with --mask-vae the mask is drawn."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scripted_paligemma import SIDE, write_scripted_paligemma

from polymodal.data.locations import LocatedObject, Locations, draw_locations, format_object, parse_locations
from polymodal.data.synthetic import World
from polymodal.encoders.mask_vae import MaskVAE

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BOX = (4, 6, 20, 30)
ANSWER = format_object(BOX, SIDE, "red circle", list(range(40, 56)))


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    directory = tmp_path_factory.mktemp("segmenter") / "scripted"
    write_scripted_paligemma(directory, ANSWER)
    World(seed=0).draw("red", "circle").save(directory.parent / "scene.png")
    return directory


def generate(directory, out, *flags):
    return subprocess.run([sys.executable, "-m", "polymodal.cli", "generate", str(directory), "--prompt",
                           "segment red circle", "--image", str(directory.parent / "scene.png"), "--draw", str(out),
                           *map(str, flags)], env=ENV, capture_output=True, text=True, timeout=120)


def test_without_a_mask_vae_the_boxes_are_drawn_and_the_masks_said_skipped(segmenter, tmp_path):
    done = generate(segmenter, tmp_path / "drawn.png")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0] == ANSWER
    [found] = parse_locations(ANSWER, (SIDE, SIDE), boxes_only=True).objects
    assert f"object 'red circle': box (x1, y1, x2, y2) = ({', '.join(f'{v:.1f}' for v in found.box)})\n" in done.stdout
    assert "the masks of 1 object(s) were skipped" in done.stderr and "--mask-vae" in done.stderr, done.stderr
    image = Image.open(segmenter.parent / "scene.png")
    expected = draw_locations(image, Locations([LocatedObject("red circle", found.box)], 0))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "drawn.png")), np.asarray(expected))


def test_with_a_mask_vae_its_mask_is_drawn(segmenter, tmp_path):
    torch.manual_seed(0)
    vae = MaskVAE().eval()
    np.savez(tmp_path / "vae.npz", **{k: v.numpy() for k, v in vae.state_dict().items()})
    done = generate(segmenter, tmp_path / "drawn.png", "--mask-vae", tmp_path / "vae.npz")
    assert done.returncode == 0 and "skipped" not in done.stderr, done.stderr[-2000:]
    found = parse_locations(ANSWER, (SIDE, SIDE), vae)
    expected = draw_locations(Image.open(segmenter.parent / "scene.png"), found)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "drawn.png")), np.asarray(expected))
    assert found.objects[0].mask.any()  # a mask was there to draw
