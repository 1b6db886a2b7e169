"""Two processes under a real `torchrun` (gloo, CPU) compute the same losses as one process
accumulating the same global batch, with FSDP2 and with DDP; FSDP2 checkpoints, written sharded, resume
on one process and a one-process checkpoint resumes on two, exactly."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import polymodal as pm
from polymodal.train.checkpoint import latest_checkpoint

FLAGS = ["--model", "paligemma-tiny", "--max-steps", "4", "--warmup-steps", "1", "--eval-every", "2",
         "--eval-docs", "8", "--checkpoint-every", "2", "--device", "cpu"]


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
    return (*losses(tmp / "single"), tmp / "single")


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_processes_match_one_process(parallel, single, tmp_path, torchrun):
    out = torchrun("-m", "polymodal.cli", "train", *FLAGS, "--batch-size", "4", "--parallel", parallel,
                   "--out-dir", tmp_path, "--name", parallel, timeout=240, cwd=tmp_path)
    assert "2 process(es)" in out.stdout
    train, evals = losses(tmp_path / parallel)
    assert len(train) == 4 and len(evals) == 2
    assert max(abs(a - b) for a, b in zip(train + evals, single[0] + single[1])) <= 1e-5, (train, single)
    pm.from_pretrained(latest_checkpoint(tmp_path / parallel / "checkpoints"))


def test_a_sharded_checkpoint_of_two_processes_resumes_on_one_exactly(single, tmp_path, torchrun):
    torchrun("-m", "polymodal.cli", "train", *FLAGS, "--batch-size", "4", "--out-dir", tmp_path, "--name", "run",
             timeout=240, cwd=tmp_path)
    step2, step4 = tmp_path / "run" / "checkpoints" / "step-000002", tmp_path / "run" / "checkpoints" / "step-000004"
    assert (step2 / "sharded").is_dir() and not (step2 / "model.safetensors").exists()  # no gather onto rank 0
    lost = sorted((step4 / "sharded").glob("*.safetensors"))
    assert len(lost) == 2  # one file per process
    lost[1].unlink()  # one process's shards of step 4 lost: the resume falls back to step 2
    out = launch([sys.executable, "-m", "polymodal.cli", "train", *FLAGS, "--batch-size", "4", "--grad-accum", "2",
                  "--out-dir", str(tmp_path), "--name", "run", "--resume"], tmp_path)
    assert "cannot resume from step-000004" in out.stdout and "a process's shard file is missing" in out.stdout
    assert "step-000002 at step 2" in out.stdout  # resumed from it
    train, evals = losses(tmp_path / "run")
    assert max(abs(a - b) for a, b in zip(train + evals, single[0] + single[1])) <= 1e-5, (train, single)
    # one command makes the sharded checkpoint a plain directory: the one-process run's weights at step 2
    launch([sys.executable, "-m", "polymodal.cli", "convert", str(step2), str(tmp_path / "plain"), "--to", "polymodal"],
           tmp_path)
    assert (tmp_path / "plain" / "model.safetensors").is_file() and (tmp_path / "plain" / "tokenizer.json").is_file()
    exported = pm.from_pretrained(tmp_path / "plain").state_dict()
    reference = pm.from_pretrained(single[2] / "checkpoints" / "step-000002").state_dict()
    assert exported.keys() == reference.keys()
    assert all(torch.allclose(exported[k], reference[k], atol=1e-5, rtol=0) for k in reference)


def test_a_one_process_checkpoint_resumes_on_two_exactly(single, tmp_path, torchrun):
    run = tmp_path / "run"
    shutil.copytree(single[2], run)
    shutil.rmtree(run / "checkpoints" / "step-000004")
    torchrun("-m", "polymodal.cli", "train", *FLAGS, "--batch-size", "4", "--grad-accum", "1", "--out-dir", tmp_path,
             "--name", "run", "--resume", timeout=240, cwd=tmp_path)
    train, evals = losses(run)
    assert max(abs(a - b) for a, b in zip(train + evals, single[0] + single[1])) <= 1e-5, (train, single)
    assert (run / "checkpoints" / "step-000004" / "sharded").is_dir()


def test_siglip_over_two_processes_trains_on_the_global_batch(tmp_path, torchrun):
    """Each process's images meet both processes' captions (the ring sigmoid loss): the train losses of
    2 processes x 4 pairs equal 1 process x 8 pairs (a per-process loss would not)."""
    flags = ["--model", "siglip-tiny", "--tasks", "caption", *FLAGS[2:], "--out-dir", str(tmp_path)]
    launch([sys.executable, "-m", "polymodal.cli", "train", *flags, "--batch-size", "8", "--name", "single"], tmp_path)
    torchrun("-m", "polymodal.cli", "train", *flags, "--batch-size", "4", "--name", "two", timeout=240, cwd=tmp_path)
    one, two = losses(tmp_path / "single")[0], losses(tmp_path / "two")[0]
    assert len(two) == 4 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)


def test_a_lora_run_over_two_processes_writes_the_adapter_as_one_process_does(single, tmp_path, torchrun):
    """FSDP processes fine-tuning LoRA adapters gather and write the adapter alone, in peft's layout: the same
    files and, accumulating the same global batch, the same losses and adapter as one process."""
    flags = ["--init-from", single[2] / "checkpoints" / "step-000002", "--lora-rank", 4, *FLAGS[4:], "--max-steps", 2, "--batch-size", 4, "--out-dir", tmp_path]
    launch([sys.executable, "-m", "polymodal.cli", "train", *map(str, flags), "--grad-accum", "2", "--name", "one"],
           tmp_path)
    torchrun("-m", "polymodal.cli", "train", *flags, "--name", "two", timeout=240, cwd=tmp_path)
    one, two = (latest_checkpoint(tmp_path / name / "checkpoints") for name in ("one", "two"))
    assert one.name == two.name == "step-000002"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert (two / "adapter_model.safetensors").is_file() and not (two / "model.safetensors").exists()
    assert not (two / "sharded").exists()
    (train_two, evals_two), (train_one, evals_one) = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(train_two) == 2 and len(evals_two) == 1
    assert max(abs(a - b) for a, b in zip(train_two + evals_two, train_one + evals_one)) <= 1e-5
    adapter_one, adapter_two = (load_file(str(d / "adapter_model.safetensors")) for d in (one, two))
    assert adapter_one.keys() == adapter_two.keys() and len(adapter_one) > 0
    assert all(torch.allclose(adapter_one[k], adapter_two[k], atol=1e-5, rtol=0) for k in adapter_one)
    assert json.loads((one / "adapter_config.json").read_text()) == json.loads((two / "adapter_config.json").read_text())
