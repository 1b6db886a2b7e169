"""Training on WebDataset tar shards: a run resumed mid-epoch (its epoch boundary still ahead) continues the
exact loss trajectory, and two `torchrun` processes read the global batch between them (each its own share:
their losses equal one process accumulating both halves). Slow-ish: three trainings and a torchrun."""

import json
import shutil

import pytest
import webdataset as wds

from polymodal.cli import main
from polymodal.data.synthetic import COLOURS, SHAPES, World
from polymodal.train.checkpoint import list_checkpoints

WORLD = World(seed=0)
FLAGS = ["--model", "paligemma-tiny", "--max-steps", "4", "--warmup-steps", "1", "--eval-every", "100",
         "--checkpoint-every", "2", "--keep-checkpoints", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """20 captioned images in 4 shards of 5 (the brace pattern)."""
    root = tmp_path_factory.mktemp("shards")
    pairs = [(c, s) for c in COLOURS for s in SHAPES][:10]
    with wds.ShardWriter(str(root / "part-%03d.tar"), maxcount=5, verbose=0) as sink:
        for n in range(20):
            colour, shape = pairs[n % len(pairs)]
            sink.write({"__key__": f"{n:05d}", "png": WORLD.draw(colour, shape), "txt": f"a {colour} {shape}"})
    return str(root / "part-{000..003}.tar")


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_mid_epoch_continues_exactly(shards, tmp_path, one_thread):
    flags = [*FLAGS, "--data", shards, "--batch-size", "6", "--out-dir", str(tmp_path)]
    assert main(["train", *flags, "--name", "whole"]) == 0
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")  # as a kill after step 2 leaves it: 12 of 20 documents read
    shutil.rmtree(list_checkpoints(tmp_path / "cut" / "checkpoints")[-1])
    assert main(["train", *flags, "--name", "cut", "--resume"]) == 0
    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert len(cut) == 4 and cut == pytest.approx(whole, abs=1e-6)


def test_two_processes_share_the_global_batch(shards, tmp_path, torchrun, one_thread):
    flags = [*FLAGS, "--data", shards, "--out-dir", str(tmp_path)]
    assert main(["train", *flags, "--batch-size", "3", "--grad-accum", "2", "--name", "one"]) == 0
    torchrun("-m", "polymodal.cli", "train", *flags, "--batch-size", "3", "--parallel", "ddp", "--name", "two",
             timeout=240, cwd=tmp_path)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(two) == 4 and two == pytest.approx(one, abs=1e-5)
