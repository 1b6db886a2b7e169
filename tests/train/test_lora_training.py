"""`polymodal train --init-from DIR --lora-rank R` on a tiny PaliGemma: only the adapter trains and is
checkpointed, a kill -9 then --resume continues the exact loss trajectory, merged == unmerged logits."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import polymodal as pm
from polymodal.config import ConfigError
from polymodal.convert.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.collators import make_collator
from polymodal.nn.lora import adapters
from polymodal.serialization import WEIGHTS
from polymodal.train.checkpoint import list_checkpoints, load_checkpoint
from polymodal.train.trainer import TrainConfig, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FLAGS = ["--max-steps", 6, "--batch-size", 4, "--checkpoint-every", 2, "--eval-every", 6, "--eval-docs", 4,
         "--keep-checkpoints", 4, "--tasks", "count", "position", "--lora-rank", 4, "--lora-targets", "q,v,o,down_proj"]


def cli(*args):
    return [sys.executable, "-m", "polymodal.cli", *map(str, args)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny PaliGemma trained a few steps: the model the adapters fine-tune."""
    out = tmp_path_factory.mktemp("base")
    run = train(TrainConfig(model="paligemma-tiny", out_dir=str(out), name="base", max_steps=1, batch_size=4,
                            eval_docs=4, tasks=("colour", "shape")))
    return list_checkpoints(run / "checkpoints")[-1]


def metrics(run):
    return [{k: v for k, v in json.loads(line).items() if k != "step_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_kill_9_then_resume_trains_only_the_adapter_exactly(base, tmp_path, kill_at_first_checkpoint):
    flags = [*FLAGS, "--init-from", base, "--out-dir", tmp_path]
    subprocess.run(cli("train", *flags, "--name", "reference"), env=ENV, check=True, capture_output=True)
    killed = tmp_path / "killed"
    saved = kill_at_first_checkpoint(cli("train", *flags, "--name", "killed"), killed)
    assert saved and saved[-1].name != "step-000006", "the run finished before the kill"
    out = subprocess.run(cli("train", *flags, "--name", "killed", "--resume"), env=ENV, check=True,
                         capture_output=True, text=True)
    assert f"resumed from {saved[-1]}" in out.stdout
    assert metrics(killed) == metrics(tmp_path / "reference")  # every loss exactly equal

    last = list_checkpoints(killed / "checkpoints")[-1]
    assert not (last / WEIGHTS).exists()  # only the adapter is checkpointed ...
    adapter = load_file(str(last / ADAPTER_WEIGHTS))
    config = json.loads((last / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    n_layers = pm.from_pretrained(base).config.text.n_layers
    assert len(adapter) == 2 * 4 * n_layers and all("language_model.layers" in k for k in adapter)
    _, optimizer, _ = load_checkpoint(last)
    assert optimizer["state"] and all("lora_" in name for name in optimizer["state"])  # ... and its optimizer
    assert any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)  # B started at 0: it trained

    tuned, frozen = pm.from_pretrained(last), pm.from_pretrained(base)  # the base, from base_model_name_or_path
    for name, p in frozen.state_dict().items():
        assert torch.equal(tuned.state_dict()[name], p), name  # the base weights did not move

    tok = Tokenizer.from_file(last)
    docs = [World(seed=0).sample("position", i, "eval").document for i in range(4)]
    batch = make_collator(tuned.config, tok)(docs)
    with torch.no_grad():
        unmerged = tuned(**{k: v for k, v in batch.items() if k != "labels"}).logits
        assert (unmerged - frozen(**{k: v for k, v in batch.items() if k != "labels"}).logits).abs().max() > 1e-3
        pm.merge_lora(tuned)
        assert not adapters(tuned) and set(tuned.state_dict()) == set(frozen.state_dict())
        merged = tuned(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert (merged - unmerged).abs().max() <= 1e-5

    World(seed=0).draw("red", "circle").save(tmp_path / "red.png")  # the adapter checkpoint, quantized, from the CLI
    out = subprocess.run(cli("generate", last, "--prompt", "where is the red circle?", "--image", tmp_path / "red.png",
                             "--max-new-tokens", 3, "--quantize", "int8"), env=ENV, capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]  # (6 steps: its answer may be empty)


def test_lora_options_are_checked_before_training(base, tmp_path):
    with pytest.raises(ConfigError, match="init_from"):
        TrainConfig(lora_rank=4)
    for bad in (0, float("nan"), 2.5, True):
        with pytest.raises(ConfigError, match=r"lora_rank.* must be (an integer >= 1|a finite number|an integer or None)"):
            TrainConfig(lora_rank=bad, init_from=str(base))
    for name, bad in (("lora_alpha", 0), ("lora_alpha", float("nan")), ("lora_dropout", 1.0),
                      ("lora_dropout", float("nan")), ("lora_dropout", -0.1)):
        with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
            TrainConfig(lora_rank=2, init_from=str(base), **{name: bad})
    with pytest.raises(ValueError, match="unknown LoRA target 'qq'"):
        train(TrainConfig(init_from=str(base), lora_rank=2, lora_targets="q,qq", out_dir=str(tmp_path), max_steps=1))
