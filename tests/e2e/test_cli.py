"""The `polymodal` command end to end, as real subprocesses: the main job on a tiny budget, kill -9 and
an exact resume, and user mistakes that end in one clear line instead of a traceback."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import polymodal as pm
from polymodal.cli import main
from polymodal.data.documents import write_jsonl
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.train.checkpoint import list_checkpoints, load_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread a process: steady on a busy machine


def polymodal(*args, check=True, **kwargs):
    out = subprocess.run([sys.executable, "-m", "polymodal.cli", *map(str, args)], capture_output=True, text=True,
                         env=ENV, timeout=300, **kwargs)
    if check and out.returncode != 0:
        raise AssertionError(f"polymodal {' '.join(map(str, args))} failed:\n{out.stdout}\n{out.stderr}")
    return out


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_main_job_on_a_tiny_budget_then_eval_and_generate(tmp_path):
    out = polymodal("train", "--max-steps", 30, "--out-dir", tmp_path, "--eval-every", 30, cwd=tmp_path)
    run = tmp_path / "paligemma-world"
    losses = [r["loss"] for r in metrics(run) if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5]) / 2, losses
    assert (run / "loss.png").is_file() and (run / "tokenizer.json").is_file()
    assert "step 30/30" in out.stdout and "tok/s" in out.stdout
    [checkpoint] = list_checkpoints(run / "checkpoints")

    out = polymodal("eval", run, "--n", 50)
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
    assert sorted(rows) == sorted(("caption", "colour", "shape", "count", "position"))
    assert rows["colour"][1] == "50" and rows["colour"][-1] == "25.0%"
    assert all(cell.endswith("%") for row in rows.values() for cell in row[2:])  # accuracy, blanked, majority

    World(seed=0).draw("red", "circle").save(tmp_path / "red.png")
    out = polymodal("generate", checkpoint, "--prompt", "what colour is the shape?", "--image", tmp_path / "red.png",
                    "--max-new-tokens", 4)
    assert out.stdout.strip() and out.stderr == ""


def test_kill_9_then_resume_continues_the_exact_loss_trajectory(tmp_path, kill_at_first_checkpoint):
    flags = ["--model", "paligemma-tiny", "--max-steps", 24, "--batch-size", 8, "--checkpoint-every", 4,
             "--eval-every", 8, "--eval-docs", 16, "--keep-checkpoints", 3, "--out-dir", tmp_path]
    polymodal("train", *flags, "--name", "reference")

    killed = tmp_path / "killed"
    saved = kill_at_first_checkpoint([sys.executable, "-m", "polymodal.cli", "train", *flags, "--name", "killed"],
                                     killed)
    assert saved and saved[-1].name != "step-000024", "the run finished before the kill"
    for checkpoint in saved:  # every visible checkpoint is whole
        load_checkpoint(checkpoint)
        pm.from_pretrained(checkpoint)

    out = polymodal("train", *flags, "--name", "killed", "--resume")
    assert f"resumed from {saved[-1]}" in out.stdout
    untimed = lambda records: [{k: v for k, v in r.items() if k != "step_s"} for r in records]  # noqa: E731
    assert untimed(metrics(killed)) == untimed(metrics(tmp_path / "reference"))  # every loss exactly equal


def image_doc(path: str) -> str:
    return json.dumps({"segments": [{"image": path}, {"text": "what colour?"}, {"text": "red", "target": True}]})


@pytest.mark.parametrize("case", ["malformed", "missing image", "unreadable image"])
def test_bad_data_ends_in_one_line_naming_the_document_line(case, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    write_jsonl([World(seed=0).sample("colour", 0).document], good)
    lines = good.read_text().splitlines() * 2
    if case == "malformed":
        lines.append('{"segments": [{"text": "unterminated}')
    elif case == "missing image":
        lines.append(image_doc("nowhere.png"))
    else:
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        lines.append(image_doc("broken.png"))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    code = main(["train", "--data", str(tmp_path / "data.jsonl"), "--out-dir", str(tmp_path), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "data.jsonl, line 3" in err
    assert {"malformed": "malformed JSON", "missing image": "missing file",
            "unreadable image": "readable image file"}[case] in err


def test_user_mistakes_through_the_console_script(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"segments": [{"text": "hi"}]}\nnot json\n')
    out = polymodal("train", "--data", tmp_path / "bad.jsonl", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "bad.jsonl, line 2, document: expected one JSON object, got malformed JSON" in out.stderr
    out = polymodal("generate", tmp_path / "nothing-here", "--prompt", "hi", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "neither a model directory" in out.stderr


def test_export_data_then_train_on_it(tmp_path, capsys):
    data = tmp_path / "world.jsonl"
    assert main(["export-data", str(data), "--n", "12", "--tasks", "colour", "count"]) == 0
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(docs) == 12 and all(Image.open(tmp_path / d["segments"][0]["image"]).size == (32, 32) for d in docs)
    assert main(["train", "--model", "paligemma-tiny", "--data", str(data), "--eval-data", str(data),
                 "--max-steps", "2", "--batch-size", "4", "--out-dir", str(tmp_path), "--name", "jsonl"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out


def test_convert_round_trip(tmp_path, capsys):
    model = pm.build("llama-tiny")
    pm.save_pretrained(model, tmp_path / "ours")
    Tokenizer.train(["a few words to learn"], vocab_size=300).save(tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0  # llama, from the config
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "generation_config.json").is_file()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "polymodal"]) == 0
    back = pm.from_pretrained(tmp_path / "back")
    assert all((a == b).all() for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "x"), "--to", "hf", "--model-type", "lama"]) == 1
    assert "--model-type must be one of" in capsys.readouterr().err
