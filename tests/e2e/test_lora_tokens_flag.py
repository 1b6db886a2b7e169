"""`polymodal train --lora-tokens` with a value it cannot use (not ids, a negative id, a repeated id, an id past the
tokenizer, "locations" for a tokenizer without location tokens) is refused in one line that names the flag, what it
expects and what it got, before any weights are read: the model directory's weights file here is garbage, so an
error about it would mean the model was being loaded first. The real CLI; no run directory is left behind."""

import os
import subprocess
import sys

import pytest
import torch

import polymodal as pm
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.collators import fit_to_tokenizer
from polymodal.presets import get_preset
from polymodal.serialization import WEIGHTS


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A paligemma-tiny directory with its tokenizer (no location tokens) and a weights file of garbage."""
    directory = tmp_path_factory.mktemp("lora-tokens") / "base"
    tokenizer = Tokenizer.train(World(seed=0).texts(), vocab_size=320)
    torch.manual_seed(0)
    pm.save_pretrained(pm.build(fit_to_tokenizer(get_preset("paligemma-tiny"), tokenizer)), directory)
    tokenizer.save(directory)
    (directory / WEIGHTS).write_bytes(b"not safetensors" * 100)
    return directory


@pytest.mark.parametrize("value, expected", [
    ("1,x", "must be 'locations' or comma-separated token ids (integers >= 0), got '1,x'"),
    ("4,-3", "must be 'locations' or comma-separated token ids (integers >= 0), got '4,-3'"),
    ("7,7", "must list each token id once, got '7,7' (repeated: 7)"),
    ("7,320,99999", "must be ids of the tokenizer of {base}, in [0, 320), got 320, 99999"),
    ("locations", "'locations': the tokenizer of {base} has no location tokens (<loc0000>..)"),
])
def test_a_bad_lora_tokens_value_is_refused_before_the_model_is_read(base, tmp_path, value, expected):
    done = subprocess.run([sys.executable, "-m", "polymodal.cli", "train", "--init-from", str(base), "--lora-rank",
                           "2", "--lora-tokens", value, "--out-dir", str(tmp_path), "--max-steps", "1"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"polymodal train: error: lora_tokens (--lora-tokens) {expected.format(base=base)}"), line
    assert not any(tmp_path.iterdir())
