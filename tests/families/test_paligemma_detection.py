"""Detection fine-tuning on a user's own JSONL: boxes given in pixels (`{"boxes": [...]}`), written by PaliGemma's
format as `<locNNNN>` tokens of a tokenizer that has them; `polymodal train` (full and `--lora-rank`) learns
them, and `polymodal generate --draw` prints the parsed objects and draws them over the image."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from polymodal.data.documents import read_jsonl, write_jsonl
from polymodal.cli import main
from polymodal.data.locations import (COLOURS, LocatedObject, Locations, add_location_tokens, draw_locations,
                                      format_object, parse_locations)
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import DocumentError
from polymodal.families.collators import make_collator
from polymodal.presets import get_preset
from polymodal.families.paligemma.format import PaliGemmaFormat
from polymodal.train.checkpoint import list_checkpoints
from polymodal.train.trainer import TrainConfig, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BOXES = [(2, 3, 14, 17), (16, 4, 30, 12), (5, 18, 21, 30), (20, 20, 29, 31)]  # (x1, y1, x2, y2) in 32x32 images


def cli(*args):
    return [sys.executable, "-m", "polymodal.cli", *map(str, args)]


def scene(box) -> Image.Image:
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(200, 30, 30))
    return image


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("detect")
    lines = []
    for i, box in enumerate(BOXES):
        scene(box).save(d / f"{i}.png")
        lines.append({"segments": [{"image": f"{i}.png"}, {"text": "detect red box"},
                                   {"boxes": [{"label": "red box", "box": list(box)}], "target": True}]})
    (d / "detect.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    tok = Tokenizer.train(["detect red box", "red box"] * 20, vocab_size=300)
    add_location_tokens(tok)
    tok.save(d / "tokenizer")
    return d


def test_boxes_are_written_as_the_tokenizer_s_location_tokens(data):
    tok = Tokenizer.from_file(data / "tokenizer")
    [doc] = read_jsonl(data / "detect.jsonl")[:1]
    assert doc.segments[2].boxes == [("red box", (2.0, 3.0, 14.0, 17.0))]
    config = PaliGemmaFormat.fit(get_preset("paligemma-tiny"), tok)
    encoded = PaliGemmaFormat(config, tok).encode(doc)
    answer = format_object(BOXES[0], (32, 32), "red box")  # bins of [y1, x1, y2, x2]
    expected = tok.encode(answer) + [tok.eos_id]
    labels = [i for i in encoded.tokens["labels"] if i != -100]
    assert labels == expected and sum(i >= 300 for i in labels) == 4  # four appended location tokens
    assert parse_locations(tok.decode(labels), (32, 32)).objects[0].box == pytest.approx(BOXES[0], abs=32 / 1023)


def test_boxes_need_location_tokens_and_one_image(data, tmp_path):
    plain = Tokenizer.train(["detect red box"] * 10, vocab_size=280)
    docs = read_jsonl(data / "detect.jsonl")
    with pytest.raises(DocumentError, match="tokenizer has no location tokens"):
        make_collator(PaliGemmaFormat.fit(get_preset("paligemma-tiny"), plain), plain)(docs[:1])
    tok = Tokenizer.from_file(data / "tokenizer")
    doc = docs[0]
    doc.segments.insert(0, doc.segments[0])
    with pytest.raises(DocumentError, match="has boxes and 2 images"):
        PaliGemmaFormat(PaliGemmaFormat.fit(get_preset("paligemma-tiny"), tok), tok).encode(doc)
    write_jsonl(docs[:1], tmp_path / "back.jsonl")  # a boxes segment is written back as one
    assert read_jsonl(tmp_path / "back.jsonl")[0].segments[2].boxes == docs[0].segments[2].boxes


@pytest.mark.parametrize("bad, message", [
    ({"boxes": [{"label": "a", "box": [5, 5, 5, 9]}], "target": True}, r"boxes\[0\]\.box: expected \[x1, y1, x2, y2\]"),
    ({"boxes": [{"label": "a;b", "box": [1, 1, 5, 9]}], "target": True}, r"boxes\[0\]\.label: expected a non-empty"),
    ({"boxes": [{"label": "a", "box": [1, 1, 5, 9]}]}, r"segments\[2\]\.target: expected true"),
    ({"boxes": []}, r"segments\[2\]\.target: expected true"),
    ({"boxes": [{"box": [1, 1, 5, 9]}], "target": True}, r"expected an object with the keys 'label' and 'box'"),
])
def test_malformed_boxes_are_refused_naming_the_field(tmp_path, bad, message):
    scene(BOXES[0]).save(tmp_path / "a.png")
    line = {"segments": [{"image": "a.png"}, {"text": "detect a"}, bad]}
    (tmp_path / "bad.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(DocumentError, match=message):
        read_jsonl(tmp_path / "bad.jsonl")


@pytest.fixture(scope="module")
def learned(data, tmp_path_factory):
    """paligemma-tiny trained from scratch on the four scenes with the tokenizer given location tokens."""
    out = tmp_path_factory.mktemp("runs")
    run = train(TrainConfig(model="paligemma-tiny", data=str(data / "detect.jsonl"), tokenizer=str(data / "tokenizer"),
                            out_dir=str(out), name="detect", max_steps=40, batch_size=4, lr=1e-2, warmup_steps=5,
                            eval_every=1000, log_every=1000, checkpoint_every=1000, seed=0))
    return run


def test_lora_fine_tuning_on_detection_documents_lowers_the_loss(learned, data, tmp_path):
    base = list_checkpoints(learned / "checkpoints")[-1]
    subprocess.run(cli("train", "--init-from", base, "--lora-rank", 4, "--data", data / "detect.jsonl",
                       "--max-steps", 8, "--batch-size", 4, "--lr", 1e-2, "--warmup-steps", 1, "--out-dir", tmp_path,
                       "--name", "lora", "--eval-every", 100), env=ENV, check=True, capture_output=True)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 8 and np.mean(losses[-3:]) < np.mean(losses[:3])


def test_generate_draws_the_answer_s_boxes(learned, data, tmp_path):
    out = tmp_path / "drawn.png"
    done = subprocess.run(cli("generate", learned, "--prompt", "detect red box", "--image", data / "0.png",
                              "--draw", out), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = done.stdout.splitlines()[0]
    found = parse_locations(answer, (32, 32))
    assert len(found.objects) == 1 and found.objects[0].label == "red box", done.stdout
    x1, y1, x2, y2 = (round(v) for v in found.objects[0].box)
    assert f"object 'red box': box (x1, y1, x2, y2) = " in done.stdout
    drawn, original = np.asarray(Image.open(out)), np.asarray(Image.open(data / "0.png"))
    colour = drawn[y1, x1]
    assert tuple(colour) not in {(255, 255, 255), (200, 30, 30)}  # the outline's own colour
    for y, x in ((y2 - 1, (x1 + x2) // 2), ((y1 + y2) // 2, x1), ((y1 + y2) // 2, x2 - 1), (y2 - 1, x2 - 1)):
        assert (drawn[y, x] == colour).all(), (y, x)
    assert (drawn[:y1] == original[:y1]).all() and (drawn[:, :x1] == original[:, :x1]).all()  # above, left: nothing
    again = subprocess.run(cli("generate", learned, "--prompt", "detect red box", "--image", data / "0.png",
                               "--draw", out), env=ENV, capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr.splitlines()[-1]


def test_masks_are_tinted_inside_and_nothing_outside():
    image = scene(BOXES[0])
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[5:15, 4:12] = True
    drawn = np.asarray(draw_locations(image, Locations([LocatedObject("", (2.0, 3.0, 14.0, 17.0), mask)], 0)))
    original = np.asarray(image).astype(int)
    assert (drawn[6:14, 5:11] == (original[6:14, 5:11] + COLOURS[0]) // 2).all()
    outside = ~mask.numpy()
    outside[3:17, 2:14] = False  # the box's outline
    assert (drawn[outside] == original[outside]).all()


@pytest.mark.parametrize("flags, message", [
    (["--mask-vae", "vae.npz"], "--mask-vae decodes the masks --draw draws"),
    (["--draw", "out.jpg"], "expected a path ending in .png, got out.jpg"),
    (["--draw", "out.png", "--image", "0.png"], "expected one --image and no --audio, got 2 image"),
])
def test_draw_flags_are_checked_before_the_model_loads(data, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(data)
    code = main(["generate", str(tmp_path / "no-model"), "--prompt", "detect red box", "--image", "0.png", *flags])
    assert code == 1 and message in capsys.readouterr().err
