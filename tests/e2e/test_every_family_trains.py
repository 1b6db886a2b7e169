"""`polymodal train --model M` for a preset of every family, on a short budget: it runs, checkpoints and
learns (the loss falls); `polymodal eval` scores the run the way its family is scored. The PaliGemma
main job has its own tests (test_cli.py). Each run is a few seconds of training on one thread."""

import json
import shutil

import pytest
import torch

import polymodal as pm
from polymodal.cli import main
from polymodal.families import load_config
from polymodal.data.documents import Document, Segment, write_jsonl
from polymodal.data.synthetic import World
from polymodal.train.checkpoint import list_checkpoints

# preset: (world tasks, steps, batch size)
FAMILIES = {
    "kosmos-tiny": ("colour", 30, 8),
    "gemini-tiny": ("colour", 30, 8),
    "gemini-tiny-usm": ("audio_pitch", 30, 8),
    "chameleon-tiny": ("colour", 30, 8),
    "flamingo-tiny": ("colour", 30, 8),
    "flamingo-palm": ("colour", 30, 8),
}  # the dual encoders: test_dual_encoder_retrieves_captions_above_chance


def losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def train(tmp_path, *flags):
    assert main(["train", "--out-dir", str(tmp_path), "--warmup-steps", "5", "--log-every", "1000", *flags]) == 0


def falls(values):
    return sum(values[-5:]) < 0.8 * sum(values[:5])


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_train_on_the_world_learns(preset, tmp_path):
    task, steps, batch = FAMILIES[preset]
    train(tmp_path, "--model", preset, "--tasks", task, "--max-steps", str(steps), "--batch-size", str(batch),
          "--eval-every", str(steps), "--eval-docs", "32")
    run = tmp_path / preset
    assert len(losses(run)) == steps and falls(losses(run)), losses(run)
    assert list_checkpoints(run / "checkpoints")


def eval_rows(run, capsys, n=100, *flags):
    capsys.readouterr()
    assert main(["eval", str(run), "--n", str(n), *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    return lines[0], {line.split()[0]: line.split()[1:] for line in lines[2:]}


@pytest.mark.parametrize("preset", ["clip-tiny", "siglip-tiny"])
def test_dual_encoder_retrieves_captions_above_chance(preset, tmp_path, capsys):
    flags = ["--model", preset, "--tasks", "caption", "--max-steps", "60", "--batch-size", "32", "--eval-every", "60",
             "--checkpoint-every", "30", "--keep-checkpoints", "3"]
    train(tmp_path, *flags, "--name", "run")
    run = tmp_path / "run"
    assert falls(losses(run))
    title, rows = eval_rows(run, capsys)
    n, accuracy, blanked, majority, chance = rows["caption"]
    assert "retrieval" in title and chance == "8.3%"  # 12 captions
    assert float(accuracy[:-1]) > 8.3  # measured at 60 steps: clip-tiny 47%, siglip-tiny 13%
    if preset == "clip-tiny":  # clear of chance and of blank images at this budget
        assert float(accuracy[:-1]) >= 3 * 8.3 and float(accuracy[:-1]) > float(blanked[:-1])
        # resume from step 30 as if the run had been killed there: every later loss equal
        shutil.rmtree(run / "checkpoints" / "step-000060")
        reference = losses(run)
        train(tmp_path, *flags, "--name", "run", "--resume")
        assert losses(run) == reference


def test_flamingo_trains_on_a_jsonl_file_and_eval_answers_world_questions(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    assert main(["export-data", str(data), "--n", "24", "--tasks", "colour", "count"]) == 0
    train(tmp_path, "--model", "flamingo-tiny", "--data", str(data), "--eval-data", str(data), "--max-steps", "20",
          "--batch-size", "8", "--eval-every", "20", "--name", "fl")
    assert falls(losses(tmp_path / "fl"))
    title, rows = eval_rows(tmp_path / "fl", capsys, 20, "--tasks", "colour", "count")  # a file's run names them
    assert "greedy answers" in title and rows["colour"][-1] == "25.0%"  # scored beside chance


@pytest.mark.parametrize("preset", ["kosmos-tiny", "chameleon-tiny"])
def test_early_fusion_trains_on_a_jsonl_file(preset, tmp_path):
    """The README's CLI row: every family's preset learns from a JSONL file too (gemini-tiny and paligemma-tiny
    from LLaVA and messages files: tests/e2e/test_train_on_data_formats.py)."""
    data = tmp_path / "docs.jsonl"
    assert main(["export-data", str(data), "--n", "24", "--tasks", "colour", "count"]) == 0
    train(tmp_path, "--model", preset, "--data", str(data), "--max-steps", "30", "--batch-size", "8",
          "--vq-steps", "2", "--name", "run")
    assert falls(losses(tmp_path / "run")), losses(tmp_path / "run")


def test_dual_encoder_trains_on_a_jsonl_file_of_pairs(tmp_path, capsys):
    world = World(seed=0)
    pairs = [Document([Segment("image", media=world.draw(c, s)), Segment("text", f"a {c} {s}")])
             for c in ("red", "green", "blue") for s in ("circle", "square")] * 4
    write_jsonl(pairs, tmp_path / "pairs.jsonl")
    train(tmp_path, "--model", "clip-tiny", "--data", str(tmp_path / "pairs.jsonl"), "--max-steps", "20",
          "--batch-size", "6", "--name", "pairs")
    assert falls(losses(tmp_path / "pairs"))
    assert main(["generate", str(tmp_path / "pairs"), "--prompt", "a red circle"]) == 1
    assert "writes nothing; score it with `polymodal eval`" in capsys.readouterr().err
    bad = [Document([Segment("image", media=world.draw("red", "circle")), Segment("image", media=world.draw("red", "circle")),
                     Segment("text", "two")])]
    write_jsonl(bad, tmp_path / "bad.jsonl")
    code = main(["train", "--model", "clip-tiny", "--data", str(tmp_path / "bad.jsonl"), "--out-dir", str(tmp_path)])
    assert code == 1 and "exactly one image and its caption" in capsys.readouterr().err


def test_decoder_lm_trains_on_text(tmp_path):
    world = World(seed=0)
    docs = [Document([Segment("text", e.document.texts[0]), Segment("text", e.answer, target=True)])
            for e in world.examples("train", "colour", 64)]
    write_jsonl(docs, tmp_path / "text.jsonl")
    train(tmp_path, "--model", "llama-tiny", "--data", str(tmp_path / "text.jsonl"), "--max-steps", "30",
          "--batch-size", "8", "--name", "lm")
    assert falls(losses(tmp_path / "lm"))


def test_flamingo_with_its_language_model_frozen(tmp_path, capsys):
    """Flamingo's recipe: only the perceiver and the gated cross-attention blocks train; the LM (and the
    vision encoder) keep the weights the run started from."""
    flags = ["--model", "flamingo-tiny", "--tasks", "colour", "--max-steps", "4", "--batch-size", "4",
             "--checkpoint-every", "2", "--trainable", "perceiver", "cross_layers", "--name", "frozen"]
    train(tmp_path, *flags)
    first, last = list_checkpoints(tmp_path / "frozen" / "checkpoints")
    torch.manual_seed(0)  # the run's seed: its initial weights
    start = pm.build(load_config(first / "config.json")).state_dict()
    end = pm.from_pretrained(last).state_dict()
    for key in start:
        frozen = key.startswith(("decoder.", "vision."))
        assert torch.equal(start[key], end[key]) == frozen, key
    assert main(["train", "--model", "kosmos-tiny", "--trainable", "cross_layers", "--out-dir", str(tmp_path)]) == 1
    assert "unknown parts ['cross_layers']" in capsys.readouterr().err
    # a part the config leaves out (gemini-tiny reads patches: no ViT) is refused before the VQ is fitted
    assert main(["train", "--model", "gemini-tiny", "--trainable", "vision", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr()
    assert "trainable ['vision'] leaves nothing to train in this Gemini" in err.err and "VQ" not in err.out
