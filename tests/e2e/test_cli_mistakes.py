"""Mistakes a user makes with `polymodal train / generate / eval / convert`, each ending in one line on stderr
that names what was expected and what was given, exit status 1, no traceback, and no work done first;
and `--resume` continuing a run with the settings it was started with."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import polymodal as pm
from polymodal.cli import main
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.data.documents import Audio, wav_bytes, write_jsonl
from polymodal.data.synthetic import World, recognise
from polymodal.data.tokenizer import Tokenizer
from polymodal.evaluate import TaskScore, drawn, table
from polymodal.presets import get_preset

WORLD = World(seed=0)
TINY = ["--model", "paligemma-tiny", "--batch-size", "4", "--warmup-steps", "2"]


def polymodal(*args):
    return subprocess.run([sys.executable, "-m", "polymodal.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def one_line_error(code: int, err: str) -> str:
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def colour_docs():
    """30 documents a PaliGemma reads: an image, a question, the answer."""
    return [e.document for e in WORLD.examples("train", ("colour", "count"), 30)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained paligemma-tiny with its tokenizer: enough for generate/eval/convert to load."""
    directory = tmp_path_factory.mktemp("checkpoint") / "tiny"
    tokenizer = Tokenizer.train(WORLD.texts(), vocab_size=400)
    pm.save_pretrained(pm.build(fit_to_tokenizer(get_preset("paligemma-tiny"), tokenizer)), directory)
    tokenizer.save(directory)
    return directory


def bad_line(case: str) -> str:
    return {"video for PaliGemma": json.dumps({"segments": [{"video": ["frame.png", "frame.png"]}, {"text": "which way?"},
                                                            {"text": "up", "target": True}]}),
            "longer than the context": json.dumps({"segments": [{"text": "hello " * 600}]})}[case]


@pytest.mark.parametrize("case, expected", [
    ("video for PaliGemma", "has video segments; PaliGemma reads images and text"),
    ("longer than the context", "tokens long; the limit is max_len=512"),
])
def test_a_bad_document_deep_in_the_file_stops_training_before_it_starts(case, expected, colour_docs, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    write_jsonl(colour_docs, data)
    WORLD.draw("red", "circle").save(tmp_path / "frame.png")
    with open(data, "a") as f:
        f.write(bad_line(case) + "\n")  # line 31: reached only after several steps of training
    code = main(["train", *TINY, "--data", str(data), "--max-steps", "8", "--out-dir", str(tmp_path), "--name", "run"])
    err = one_line_error(code, capsys.readouterr().err)
    assert f"{data}, line 31: " in err and expected in err, err
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_a_world_task_the_model_cannot_read_stops_training_before_it_starts(tmp_path, capsys):
    code = main(["train", *TINY, "--tasks", "colour", "audio_count", "--max-steps", "2", "--out-dir", str(tmp_path)])
    err = one_line_error(code, capsys.readouterr().err)
    assert "--tasks audio_count (the built-in world): " in err and "has audio segments; PaliGemma reads" in err, err
    assert not (tmp_path / "paligemma-tiny").exists()


def test_resume_continues_with_the_settings_the_run_was_started_with(colour_docs, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    write_jsonl(colour_docs, data)
    flags = [*TINY, "--data", str(data), "--out-dir", str(tmp_path)]
    assert main(["train", *flags, "--max-steps", "4", "--name", "straight"]) == 0
    assert main(["train", *flags, "--max-steps", "2", "--name", "resumed"]) == 0
    # the README's `polymodal train --model ... --resume`: the data, batch size, ... come from the run itself
    assert main(["train", "--out-dir", str(tmp_path), "--name", "resumed", "--resume", "--max-steps", "4"]) == 0
    assert "resumed from" in capsys.readouterr().out
    losses = lambda run: [r["loss"] for r in metrics(tmp_path / run) if "loss" in r]  # noqa: E731
    assert losses("resumed") == losses("straight") and len(losses("straight")) == 4


@pytest.mark.parametrize("case", ["malformed", "wrong type", "unknown key"])
def test_a_bad_model_config_file_is_named_before_any_data_is_read(case, tmp_path, capsys):
    config = json.loads(get_preset("paligemma-tiny").to_json())
    if case == "wrong type":
        config["text"]["n_layers"] = "2"
    elif case == "unknown key":
        config["text"]["n_layerz"] = 2
    text = json.dumps(config)
    (tmp_path / "my_config.json").write_text(text[:40] if case == "malformed" else text)
    code = main(["train", "--model", str(tmp_path / "my_config.json"), "--data", str(tmp_path / "nowhere.jsonl"),
                 "--out-dir", str(tmp_path)])
    err = one_line_error(code, capsys.readouterr().err)
    assert f"{tmp_path / 'my_config.json'}: " in err and "nowhere" not in err, err
    assert {"malformed": "malformed JSON", "wrong type": "DecoderConfig.n_layers must be int, got '2' (str)",
            "unknown key": "'n_layerz'"}[case] in err


def test_data_paths_that_are_not_jsonl_files(colour_docs, tmp_path, capsys):
    write_jsonl(colour_docs[:4], tmp_path / "data.jsonl")
    for flags, expected in [(["--data", str(tmp_path)], "--data expected a datasets folder (save_to_disk: "
                                                         "state.json) or a folder of .tar shards, got "
                                                         f"'{tmp_path}' (a folder with neither)"),
                            (["--data", str(tmp_path / "data.jsonl"), "--eval-data", str(tmp_path / "nowhere.jsonl")],
                             "--eval-data expected a data file (JSONL, JSON, parquet, .tar) or folder, got "),
                            (["--max-len", "5000"], "max_len must be at most the model's context of 512 tokens, got 5000")]:
        code = main(["train", *TINY, *flags, "--out-dir", str(tmp_path)])
        assert expected in one_line_error(code, capsys.readouterr().err)


def test_eval_data_gives_the_eval_loss_when_training_on_the_world(tmp_path, capsys):
    write_jsonl([e.document for e in WORLD.examples("eval", "count", 4)], tmp_path / "counts.jsonl")
    flags = [*TINY, "--max-steps", "1", "--eval-docs", "4", "--out-dir", str(tmp_path)]
    assert main(["train", *flags, "--name", "held-out"]) == 0
    assert main(["train", *flags, "--name", "counts", "--eval-data", str(tmp_path / "counts.jsonl")]) == 0
    eval_loss = lambda run: [r["eval_loss"] for r in metrics(tmp_path / run) if "eval_loss" in r]  # noqa: E731
    assert eval_loss("counts") != eval_loss("held-out")
    # and an eval file the model cannot read is refused, not ignored
    (tmp_path / "beeps.jsonl").write_text(json.dumps({"segments": [{"audio": "beep.wav"}, {"text": "how many beeps?"},
                                                                   {"text": "one", "target": True}]}) + "\n")
    (tmp_path / "beep.wav").write_bytes(wav_bytes(Audio(np.zeros(1600, np.float32), 16000)))
    code = main(["train", *flags, "--name", "beeps", "--eval-data", str(tmp_path / "beeps.jsonl")])
    assert f"beeps.jsonl, line 1: " in one_line_error(code, capsys.readouterr().err)


def test_generate_with_an_audio_file_that_is_not_a_wav(checkpoint, tmp_path):
    WORLD.draw("red", "circle").save(tmp_path / "red.png")
    out = polymodal("generate", checkpoint, "--prompt", "hi", "--audio", tmp_path / "red.png")
    err = one_line_error(out.returncode, out.stderr)
    assert "--audio: expected a wav file of PCM or float samples, got " in err and "red.png" in err, err


def test_generate_mistakes(checkpoint, tmp_path, capsys):
    (tmp_path / "beep.wav").write_bytes(wav_bytes(Audio(np.zeros(1600, np.float32), 16000)))
    WORLD.draw("red", "circle").save(tmp_path / "red.png")
    cases = [
        (["--image", str(tmp_path)], f"--image: expected an existing image file, got directory '{tmp_path}'"),
        (["--audio", str(tmp_path / "beep.wav")], "the document has audio segments; PaliGemma reads images and text"),
        (["--prompt", "what colour? " * 200, "--image", str(tmp_path / "red.png")],
         "and --max-new-tokens is 32: "),
        (["--prompt", "what colour? " * 80, "--max-new-tokens", "300", "--image", str(tmp_path / "red.png")],
         "--max-new-tokens is 300: "),
    ]
    for flags, expected in cases:
        code = main(["generate", str(checkpoint), "--prompt", "what colour is the shape?", *flags])
        err = one_line_error(code, capsys.readouterr().err)
        assert expected in err, err
        if "--max-new-tokens is" in expected:
            assert "past the model's context of 512 tokens" in err, err


def test_generate_speculative_flags(checkpoint, tmp_path, capsys):
    """--assistant and --prompt-lookup print what plain greedy decoding prints; a bad k is one line."""
    WORLD.draw("red", "circle").save(tmp_path / "red.png")
    ask = ["generate", str(checkpoint), "--prompt", "what colour is the shape?", "--image", str(tmp_path / "red.png"),
           "--max-new-tokens", "12"]
    outputs = []
    for flags in ([], ["--assistant", str(checkpoint), "--num-assistant-tokens", "3"], ["--prompt-lookup", "4"]):
        assert main([*ask, *flags]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[1:] == outputs[:1] * 2
    code = main([*ask, "--prompt-lookup", "0"])
    assert "prompt_lookup_num_tokens must be an int >= 1, got 0" in one_line_error(code, capsys.readouterr().err)
    other = tmp_path / "other-vocabulary"  # the preset's own vocabulary, not the tokenizer's
    pm.save_pretrained(pm.build(get_preset("paligemma-tiny")), other)
    Tokenizer.from_file(checkpoint).save(other)
    code = main([*ask, "--assistant", str(other)])
    assert "the draft's vocabulary (" in one_line_error(code, capsys.readouterr().err)


def test_eval_batch_size_and_a_table_with_long_task_names(checkpoint, capsys):
    code = main(["eval", str(checkpoint), "--n", "2", "--batch-size", "0"])
    assert "--batch-size must be >= 1, got 0" in one_line_error(code, capsys.readouterr().err)
    code = main(["eval", str(checkpoint), "--n", "2", "--tasks", "compare_cot", "--cot-k", "0"])
    assert "--cot-k and --cot-validation must be >= 1, got 0 and 100" in one_line_error(code, capsys.readouterr().err)
    code = main(["eval", str(checkpoint), "--n", "100001", "--tasks", "colour", "compare_cot"])
    assert "--n must be <= 100000 for chain-of-thought tasks" in one_line_error(code, capsys.readouterr().err)
    rows = table([TaskScore("colour", 2, 1, 0.25, 0.5, 0.5), TaskScore("video_direction", 2, 2, 0.25, 0.0, None),
                  TaskScore("text_to_image", 2, 0, 1 / 48, 0.0)]).splitlines()
    assert len({row.index("%") for row in rows[1:]}) == 1 and len({len(row) for row in rows}) == 1, rows
    assert rows[0].split() == ["task", "n", "accuracy", "blanked", "majority", "chance"]
    assert rows[2].split()[1:] == ["2", "100.0%", "-", "0.0%", "25.0%"]


def test_convert_never_replaces_what_is_not_a_checkpoint(checkpoint, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine too")
    for target in ("notes.txt", "folder"):
        code = main(["convert", str(checkpoint), str(tmp_path / target), "--to", "hf", "--model-type", "paligemma"])
        assert "exists and is not a checkpoint directory" in one_line_error(code, capsys.readouterr().err)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "folder" / "notes.txt").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "notes.txt"]  # nothing hidden left behind

    code = main(["convert", str(checkpoint), str(tmp_path / "hf"), "--to", "hf", "--model-type", "llama"])
    err = one_line_error(code, capsys.readouterr().err)
    assert "a PaliGemmaConfig model cannot be written as model_type 'llama'" in err, err
    code = main(["convert", str(checkpoint), str(tmp_path / "back"), "--to", "polymodal"])
    assert "is already a polymodal checkpoint directory" in one_line_error(code, capsys.readouterr().err)
    assert main(["convert", str(checkpoint), str(tmp_path / "hf"), "--to", "hf", "--model-type", "paligemma"]) == 0
    assert main(["convert", str(checkpoint), str(tmp_path / "hf"), "--to", "hf", "--model-type", "paligemma"]) == 0


@pytest.fixture(scope="module")
def draws_blue(tmp_path_factory):
    """A chameleon-tiny whose weights make it open an image at once and whose VQ decoder paints every pixel blue:
    it draws "a blue square" for any prompt."""
    directory = tmp_path_factory.mktemp("chameleon") / "draws-blue"
    tokenizer = Tokenizer.train(WORLD.texts(), vocab_size=400)
    cfg = fit_to_tokenizer(get_preset("chameleon-tiny"), tokenizer)
    model = pm.build(cfg)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.zero_()  # every block adds nothing: the last hidden state is the token embedding
        model.decoder.tok_embeddings.weight.fill_(1.0)
        model.decoder.norm.weight.fill_(1.0)
        model.decoder.output.weight[cfg.begin_image_id] = 1.0  # outside an image, always <img>
        model.vq.decoder.conv_out.weight.zero_()
        model.vq.decoder.conv_out.bias.copy_(torch.tensor([-1.0, -1.0, 1.0]))  # pure blue
    pm.save_pretrained(model, directory)
    tokenizer.save(directory)
    return directory


def test_eval_scores_text_to_image_on_what_the_model_draws(draws_blue, checkpoint, capsys):
    n = 24
    model, tokenizer = pm.from_pretrained(draws_blue), Tokenizer.from_file(draws_blue)
    docs = [WORLD.sample("text_to_image", i, "eval").document for i in range(n)]
    # all blue: a square whose centre lies on the grid's corner, read as the top-left cell
    assert drawn(model, make_collator(model.config, tokenizer), tokenizer, docs, "text_to_image", longest=0) == [
        "a blue square in the top left"] * n
    hits = sum(WORLD.sample("text_to_image", i, "eval").answer == "a blue square in the top left" for i in range(n))
    assert hits == 0  # the blue square's held-out cell is another: its eval prompts ask for it there
    assert main(["eval", str(draws_blue), "--tasks", "text_to_image", "--n", str(n)]) == 0
    [row] = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("text_to_image")]
    assert row == ["text_to_image", str(n), "0.0%", "-", "0.0%", "2.1%"], row
    # a model that cannot draw is told so, before any work
    code = main(["eval", str(checkpoint), "--tasks", "colour", "text_to_image", "--n", "2"])
    assert "text_to_image is scored on the images a model draws; PaliGemma draws none" in one_line_error(
        code, capsys.readouterr().err)


def test_generate_writes_drawn_images_into_image_dir(draws_blue, tmp_path, capsys):
    flags = ["generate", str(draws_blue), "--prompt", "draw a blue square", "--max-new-tokens", "70"]
    assert main([*flags, "--image-dir", str(tmp_path / "out")]) == 0
    assert f"wrote {tmp_path / 'out' / 'image_0.png'}" in capsys.readouterr().out
    assert recognise(Image.open(tmp_path / "out" / "image_0.png")) == ("blue", "square")
    (tmp_path / "a-file").write_text("")
    code = main([*flags, "--image-dir", str(tmp_path / "a-file")])
    assert "--image-dir expects a directory for the images drawn, got the file " in one_line_error(
        code, capsys.readouterr().err)


def test_export_data_into_a_new_folder_or_onto_a_directory(tmp_path, capsys):
    assert main(["export-data", str(tmp_path / "new" / "world.jsonl"), "--n", "2"]) == 0
    assert len((tmp_path / "new" / "world.jsonl").read_text().splitlines()) == 2
    code = main(["export-data", str(tmp_path / "new"), "--n", "2"])
    assert "expected a .jsonl file to write, got the directory" in one_line_error(code, capsys.readouterr().err)


def test_generate_with_a_vocabulary_padded_past_the_tokenizer(tmp_path):
    """Checkpoints often pad the vocabulary (to a multiple of 64, say) past the tokenizer's: ids there have no
    text and are left out of what generate prints, never an error. Near-uniform sampling over 464 ids, 64 of
    them padding, draws some of them within 40 tokens (all but surely; the seed fixes which)."""
    tokenizer = Tokenizer.train(WORLD.texts(), vocab_size=400)
    config = fit_to_tokenizer(get_preset("paligemma-tiny"), tokenizer)
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=tokenizer.vocab_size + 64))
    pm.save_pretrained(pm.build(config), tmp_path / "padded")
    tokenizer.save(tmp_path / "padded")
    WORLD.draw("red", "circle").save(tmp_path / "red.png")  # PaliGemma answers about an image
    out = polymodal("generate", tmp_path / "padded", "--prompt", "what colour?", "--image", tmp_path / "red.png",
                    "--max-new-tokens", 40, "--do-sample", "--temperature", 1000, "--seed", 0)
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]
    assert out.stdout.strip()
