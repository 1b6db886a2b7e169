"""`polymodal train --data` on the files people already have, through the CLI: a LLaVA conversation JSON
(two turns: the loss on both answers), a messages JSON Lines file and a `datasets` folder written by
`datasets` itself, each also the run's --eval-data. The loss falls, and the checkpoint loaded back gives the
run's last eval loss on the file's documents; `polymodal eval RUN --data FILE` then answers every assistant
turn of the same file and scores what its predictions say."""

import json

import datasets
import pytest
import torch

import polymodal as pm
from polymodal.cli import main
from polymodal.families.collators import make_collator
from polymodal.data.readers import read_documents
from polymodal.data.synthetic import COLOURS, SHAPES, World
from polymodal.data.tokenizer import Tokenizer
from polymodal.train.checkpoint import latest_checkpoint

WORLD = World(seed=0)
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    (root / "images").mkdir()
    for c, s in PAIRS:
        WORLD.draw(c, s).save(root / "images" / f"{c}-{s}.png")
    llava = [{"id": f"{c}-{s}", "image": f"images/{c}-{s}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the shape?"}, {"from": "gpt", "value": c},
        {"from": "human", "value": "and its shape?"}, {"from": "gpt", "value": s}]} for c, s in PAIRS]
    (root / "llava.json").write_text(json.dumps(llava, indent=1))
    messages = [{"messages": [{"role": "user", "content": "<image>what shape is it?"},
                              {"role": "assistant", "content": s}], "images": [f"images/{c}-{s}.png"]}
                for c, s in PAIRS]
    (root / "messages.jsonl").write_text("".join(json.dumps(m) + "\n" for m in messages))
    rows = {"id": [r["id"] for r in llava], "image": [WORLD.draw(c, s) for c, s in PAIRS],
            "conversations": [r["conversations"][:2] for r in llava]}
    datasets.Dataset.from_dict(rows, features=datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(), "conversations": datasets.List(
            {"from": datasets.Value("string"), "value": datasets.Value("string")})})).save_to_disk(str(root / "hf"))
    return root


@pytest.mark.parametrize("source, model", [("llava.json", "gemini-tiny"), ("messages.jsonl", "paligemma-tiny"),
                                           ("hf", "flamingo-tiny")])
def test_train_on_the_file_then_load_the_checkpoint(data, source, model, tmp_path, capsys, one_thread):
    path = str(data / source)
    assert main(["train", "--model", model, "--data", path, "--eval-data", path, "--max-steps", "16",
                 "--batch-size", "6", "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "16", "--eval-docs", "6",
                 "--vq-steps", "0", "--out-dir", str(tmp_path), "--name", "run"]) == 0
    assert "done: 16 steps" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4]), losses
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    model = pm.from_pretrained(checkpoint).eval()
    tokenizer = Tokenizer.from_file(checkpoint)
    batch = make_collator(model.config, tokenizer)(list(read_documents(path)[:6]))  # the run's --eval-docs 6
    with torch.no_grad():  # the saved model scores the file's documents as the run's last eval did
        loss = model(**batch).loss
    assert loss.item() == pytest.approx([r["eval_loss"] for r in records if "eval_loss" in r][-1], abs=1e-4)

    out = tmp_path / "scored"
    assert main(["eval", str(tmp_path / "run"), "--data", path, "--out", str(out)]) == 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    answers = [s.text for d in read_documents(path) for s in d.segments if s.target]  # every assistant turn
    assert [p["references"] for p in predictions] == [[a] for a in answers]
    assert all(p["score"] == float(p["prediction"].strip().lower() == p["references"][0]) for p in predictions)
    results = json.loads((out / "results.json").read_text())
    assert results["scores"][0]["n"] == len(answers)
    assert results["scores"][0]["score"] == pytest.approx(sum(p["score"] for p in predictions) / len(answers))
