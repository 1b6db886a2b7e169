"""Two processes under a real `torchrun` (gloo, CPU) compute the same losses as one process
accumulating the same global batch, with FSDP2 and with DDP."""

import json
import os
import subprocess
import sys

import pytest

import polymodal as pm
from polymodal.train.checkpoint import latest_checkpoint

FLAGS = ["--model", "paligemma-tiny", "--max-steps", "4", "--warmup-steps", "1", "--eval-every", "2",
         "--eval-docs", "8", "--checkpoint-every", "4", "--device", "cpu"]


def losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["eval_loss"] for r in records if "eval_loss" in r]


def launch(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, f"{' '.join(command)}\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    launch([sys.executable, "-m", "polymodal.cli", "train", *FLAGS, "--batch-size", "4", "--grad-accum", "2",
            "--out-dir", str(tmp), "--name", "single"], tmp)
    return losses(tmp / "single")


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_processes_match_one_process(parallel, single, tmp_path, torchrun):
    out = torchrun("-m", "polymodal.cli", "train", *FLAGS, "--batch-size", "4", "--parallel", parallel,
                   "--out-dir", tmp_path, "--name", parallel, timeout=240, cwd=tmp_path)
    assert "2 process(es)" in out.stdout
    train, evals = losses(tmp_path / parallel)
    assert len(train) == 4 and len(evals) == 2
    assert max(abs(a - b) for a, b in zip(train + evals, single[0] + single[1])) <= 1e-5, (train, single)
    pm.from_pretrained(latest_checkpoint(tmp_path / parallel / "checkpoints"))


def test_siglip_over_two_processes_trains_on_the_global_batch(tmp_path, torchrun):
    """Each process's images meet both processes' captions (the ring sigmoid loss): the train losses of
    2 processes x 4 pairs equal 1 process x 8 pairs (a per-process loss would not)."""
    flags = ["--model", "siglip-tiny", "--tasks", "caption", *FLAGS[2:], "--out-dir", str(tmp_path)]
    launch([sys.executable, "-m", "polymodal.cli", "train", *flags, "--batch-size", "8", "--name", "single"], tmp_path)
    torchrun("-m", "polymodal.cli", "train", *flags, "--batch-size", "4", "--name", "two", timeout=240, cwd=tmp_path)
    one, two = losses(tmp_path / "single")[0], losses(tmp_path / "two")[0]
    assert len(two) == 4 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
