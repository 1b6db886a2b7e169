"""The user's path to detection (issue #31): a converted HF PaliGemma directory (written by transformers, random
weights; its tokenizer holds the 1,024 location and 128 segmentation tokens at PaliGemma's ids 256000..257151 and
<image> at 257152, as HF's PaliGemma tokenizer does), fine-tuned with LoRA (`--lora-tokens locations`: the
location tokens' embedding rows train too) on the user's JSONL whose boxes are given in pixels, then
`polymodal generate --draw` and `polymodal serve` give the boxes back on held-out images."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from polymodal.data.locations import parse_locations

from detection_data import LABEL, PROMPT, SIDE, boxes, iou, scene, write_hf_paligemma, write_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args):
    return [sys.executable, "-m", "polymodal.cli", *map(str, args)]




N_TRAIN, N_HELD = 64, 12
TRAIN = ["--lora-rank", 8, "--lora-tokens", "locations", "--max-steps", 300, "--batch-size", 16, "--lr", 1e-2,
         "--warmup-steps", 10, "--eval-every", 10_000, "--checkpoint-every", 10_000, "--log-every", 10_000]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(root, run directory, held-out boxes): the HF directory LoRA-tuned on N_TRAIN scenes by `polymodal train`,
    and N_HELD new scenes (held-out: other draws of the same placement rule) saved as held-out/<i>.png."""
    root = tmp_path_factory.mktemp("detect")
    hf = root / "paligemma-hf"
    hf.mkdir()
    write_hf_paligemma(hf)
    write_jsonl(root, boxes(N_TRAIN, seed=0))
    done = subprocess.run(cli("train", "--init-from", hf, "--data", root / "detect.jsonl", "--out-dir", root / "runs",
                              "--name", "detect", *TRAIN), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (root / "held-out").mkdir()
    truth = boxes(N_HELD, seed=1)
    for i, box in enumerate(truth):
        scene(box).save(root / "held-out" / f"{i}.png")
    return root, root / "runs" / "detect", truth


def well_formed(places: list[dict]) -> bool:
    """One object, the label trained, a box inside the image with x1 < x2 and y1 < y2, no mask."""
    if len(places) != 1:
        return False
    [p] = places
    x1, y1, x2, y2 = p["box"]
    return p["label"] == LABEL and 0 <= x1 < x2 <= SIDE and 0 <= y1 < y2 <= SIDE and p["mask"] is None
