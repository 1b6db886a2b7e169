"""The training loop, in process: schedule, strict config, the same loss however a step is split
(gradient accumulation, packing, activation checkpointing), a clear stop on a non-finite loss, outputs."""

import json

import pytest
import torch
from PIL import Image

from polymodal.config import ConfigError
from polymodal.data.documents import Document, write_jsonl
from polymodal.data.synthetic import World
from polymodal.train.checkpoint import list_checkpoints
from polymodal.train.trainer import TrainConfig, TrainingError, lr_at, train


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """The world's questions and answers without their media: data a text-only decoder can learn."""
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    examples = World(seed=0).examples("train", ("caption", "colour", "position"), 64)
    write_jsonl([Document([s for s in e.document.segments if s.kind == "text"]) for e in examples], path)
    return str(path)


def run(tmp_path, data, name, **options):
    settings = dict(model="llama-tiny", data=data, eval_data=data, eval_docs=16, out_dir=str(tmp_path), name=name,
                    max_steps=6, batch_size=8, warmup_steps=2, log_every=100, eval_every=3, checkpoint_every=3)
    directory = train(TrainConfig(**{**settings, **options}))
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()], directory


def losses(records):
    return [r["loss"] for r in records if "loss" in r]


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    rates = [lr_at(s, cfg) for s in range(10, 111)]
    assert rates == sorted(rates, reverse=True)


def test_config_is_strict():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['learning_rate'\].*'lr'"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="parallel must be one of"):
        TrainConfig(parallel="zero")
    with pytest.raises(ConfigError, match="task must be one of"):
        TrainConfig(tasks=("colour", "smell"))
    with pytest.raises(ConfigError, match="attention must be one of"):
        TrainConfig(attention="flash")


def test_flex_attention_is_refused_before_training_on_cpu(tmp_path, text_data):
    with pytest.raises(ConfigError, match="attention 'flex' trains on CUDA only .* device is cpu"):
        run(tmp_path, text_data, "flex", attention="flex", device="cpu")
    assert not (tmp_path / "flex").exists()


def test_splitting_a_step_does_not_change_its_loss(tmp_path, text_data):
    reference, directory = run(tmp_path, text_data, "reference")
    assert losses(reference)[-1] < losses(reference)[0]
    for name, options in {"accumulated": {"batch_size": 4, "grad_accum": 2}, "packed": {"pack": True, "max_len": 48},
                          "checkpointed": {"activation_checkpointing": True},
                          "compiled": {"compile": True, "activation_checkpointing": True},
                          "eager attention": {"attention": "eager"}}.items():
        got = losses(run(tmp_path, text_data, name, **options)[0])
        assert max(abs(a - b) for a, b in zip(got, losses(reference))) <= 1e-5, name
    # outputs: per-step metrics with eval losses, the loss curve, only the newest checkpoints
    assert [r["step"] for r in reference if "eval_loss" in r] == [3, 6]
    assert Image.open(directory / "loss.png").format == "PNG"  # its panels: tests/train/test_plot.py
    assert [p.name for p in list_checkpoints(directory / "checkpoints")] == ["step-000003", "step-000006"]
    with pytest.raises(TrainingError, match="already holds checkpoint step-000006; pass --resume"):
        run(tmp_path, text_data, "reference")
    with pytest.raises(TrainingError, match="nothing to resume"):
        run(tmp_path, text_data, "fresh", resume=True)


def test_a_non_finite_loss_stops_training_with_a_clear_message(tmp_path, text_data):
    with pytest.raises(TrainingError, match=r"is not finite at step \d+ .*stopped before updating the weights"):
        run(tmp_path, text_data, "diverge", lr=1e30, min_lr=1e30, grad_clip=0.0, warmup_steps=0)


class Scripted:
    """An evaluation hook whose metric follows a script, one value per eval: the trainer's side of the hook
    interface (keep-best, early stop, metrics.jsonl) with a known best."""
    metrics = ("score",)

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def __call__(self, model, tokenizer):
        self.calls += 1
        return {"score": self.values[self.calls - 1]}


def test_the_best_checkpoint_is_kept_through_pruning_and_loaded_from_the_run_directory(tmp_path, text_data):
    import polymodal as pm
    from polymodal.runs import resolve

    hook = Scripted([0.2, 0.9, 0.5, 0.4, 0.3, 0.1])
    directory = train(TrainConfig(model="llama-tiny", data=text_data, eval_data=text_data, eval_docs=16,
                                  out_dir=str(tmp_path), name="best", max_steps=12, batch_size=8, warmup_steps=2,
                                  eval_every=2, checkpoint_every=2, keep_checkpoints=1, keep_best="score",
                                  early_stop=3), hooks=[hook])
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "score" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10] and hook.calls == 5  # 3 evals without a better score
    assert all("eval_loss" in r for r in evals)
    assert [p.name for p in list_checkpoints(directory / "checkpoints")] == ["step-000004", "step-000010"]
    best = json.loads((directory / "checkpoints" / "best.json").read_text())
    assert best == {"step": 4, "metric": "score", "value": 0.9}
    chosen, which = resolve(directory)
    assert chosen.name == "step-000004" and "best checkpoint by score" in which
    loaded = pm.from_pretrained(directory).state_dict()
    assert all(torch.equal(v, pm.from_pretrained(chosen).state_dict()[k]) for k, v in loaded.items())


def test_keep_best_must_name_a_measured_metric_before_training(tmp_path, text_data):
    with pytest.raises(ConfigError, match=r"keep_best 'accuracy' is not measured by this run's evals.*'eval_loss'"):
        run(tmp_path, text_data, "unknown", keep_best="accuracy")
    with pytest.raises(ConfigError, match="early_stop counts evals without a better keep_best metric"):
        run(tmp_path, text_data, "nothing", eval_data=None, keep_best="none", early_stop=2)
    assert not (tmp_path / "unknown").exists() and not (tmp_path / "nothing").exists()
