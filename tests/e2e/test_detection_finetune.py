"""The user's path to detection (issue #31): a converted HF PaliGemma directory (written by transformers, random
weights; its tokenizer holds the 1,024 location and 128 segmentation tokens at PaliGemma's ids 256000..257151 and
<image> at 257152, as HF's PaliGemma tokenizer does), fine-tuned with LoRA (`--lora-tokens locations`: the
location tokens' embedding rows train too) on the user's JSONL whose boxes are given in pixels, then
`polymodal generate --draw` and `polymodal serve` give the boxes back on held-out images."""

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polymodal.data.locations import parse_locations

from detection_data import BLUE, LABEL, PROMPT, SIDE, boxes, iou, scene, write_hf_paligemma, write_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args):
    return [sys.executable, "-m", "polymodal.cli", *map(str, args)]




N_TRAIN, N_HELD = 64, 12
MARGIN = 0.2  # mean IoU over the blind box's
QUIET = ["--batch-size", 16, "--warmup-steps", 10, "--eval-every", 10_000, "--checkpoint-every", 10_000,
         "--log-every", 10_000]
BASE = ["--max-steps", 300, "--lr", 3e-3, *QUIET]
LORA = ["--lora-rank", 8, "--lora-tokens", "locations", "--max-steps", 150, "--lr", 1e-2, *QUIET]


def run(*args) -> str:
    done = subprocess.run(cli(*args), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(root, run directory, held-out boxes). The base: the transformers-written directory trained in full on blue
    squares ("detect blue box"), converted back to HF by `polymodal convert --to hf` (a random base has no
    reading of places for LoRA to build on: LoRA on it left held-out IoU at 0-0.08, under the blind box's 0.14).
    The user's run: LoRA on red squares ("detect red box", a label and colour the base never saw), N_TRAIN
    documents; N_HELD new red scenes (other draws of the same placement rule) saved as held-out/<i>.png."""
    root = tmp_path_factory.mktemp("detect")
    for d in ("random-hf", "blue", "held-out"):
        (root / d).mkdir()
    write_hf_paligemma(root / "random-hf")
    write_jsonl(root / "blue", boxes(N_TRAIN, seed=2), BLUE, "blue box")
    run("train", "--init-from", root / "random-hf", "--data", root / "blue" / "detect.jsonl", "--out-dir",
        root / "runs", "--name", "blue", *BASE)
    run("convert", "--to", "hf", root / "runs" / "blue", root / "paligemma-hf")
    write_jsonl(root, boxes(N_TRAIN, seed=0))
    log = run("train", "--init-from", root / "paligemma-hf", "--data", root / "detect.jsonl", "--out-dir",
              root / "runs", "--name", "detect", *LORA)
    assert "trainable: LoRA rank 8" in log
    truth = boxes(N_HELD, seed=1)
    for i, box in enumerate(truth):
        scene(box).save(root / "held-out" / f"{i}.png")
    return root, root / "runs" / "detect", truth


def well_formed(places: list[dict]) -> bool:
    """One object, the label trained, a box inside the image with x1 < x2 and y1 < y2, no mask."""
    if len(places) != 1:
        return False
    [p] = places
    x1, y1, x2, y2 = p["box"]
    return p["label"] == LABEL and 0 <= x1 < x2 <= SIDE and 0 <= y1 < y2 <= SIDE and p["mask"] is None


def test_generate_prints_and_draws_the_boxes(tuned, tmp_path):
    root, run, truth = tuned
    out = tmp_path / "drawn.png"
    done = subprocess.run(cli("generate", run, "--image", root / "held-out" / "0.png", "--prompt", PROMPT, "--draw", out),
                          env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = done.stdout.splitlines()[0]
    found = parse_locations(answer, (SIDE, SIDE)).objects
    assert len(found) == 1 and found[0].label == LABEL, answer
    assert f"wrote {out} (1 object(s))" in done.stdout
    x1, y1 = (round(v) for v in found[0].box[:2])
    assert tuple(np.asarray(Image.open(out))[y1, x1]) not in {(250, 250, 250), (210, 30, 30)}  # the outline's colour


@pytest.fixture(scope="module")
def served(tuned):
    """The `openai` client of a live `polymodal serve RUN` on a free local port."""
    openai = pytest.importorskip("openai", reason="the server is asked through the openai client")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(cli("serve", tuned[1], "--port", port), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "polymodal serve did not come up in 120 s"
                time.sleep(0.2)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def ask(client, image: Path, **options):
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    return client.chat.completions.create(model="detect", temperature=0,
                                          max_tokens=12, messages=[{"role": "user", "content": [
                                              {"type": "image_url", "image_url": {"url": url}},
                                              {"type": "text", "text": PROMPT}]}], **options)


def test_the_server_returns_the_boxes_as_locations(tuned, served):
    """Each held-out answer's `message.locations` is its text's objects, boxes in pixels of the request's image;
    streamed, the chunk with the finish_reason carries the same; an answer with no object has no field."""
    root, _, truth = tuned
    replies = [ask(served, root / "held-out" / f"{i}.png").choices[0].message for i in range(len(truth))]
    formed = 0
    for message in replies:
        objects = parse_locations(message.content, (SIDE, SIDE)).objects
        places = getattr(message, "locations", None)
        if objects:
            assert places == [{"label": o.label, "box": list(o.box), "mask": None} for o in objects]
            formed += well_formed(places)
        else:
            assert places is None and "locations" not in message.model_dump()
    assert formed >= len(truth) - 1, [m.content for m in replies]
    chunks = list(ask(served, root / "held-out" / "0.png", stream=True))
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason is not None)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == replies[0].content
    assert getattr(last.choices[0].delta, "locations", None) == replies[0].locations
    found = [m.locations[0]["box"] if getattr(m, "locations", None) else None for m in replies]
    blind = tuple(np.mean(boxes(N_TRAIN, seed=0), axis=0))  # the mean training box, whatever the image
    tuned_iou = np.mean([iou(f, t) if f else 0.0 for f, t in zip(found, truth)])
    blind_iou = np.mean([iou(blind, t) for t in truth])
    print(f"held-out mean IoU {tuned_iou:.3f}, the blind box's {blind_iou:.3f}; {formed}/{len(truth)} well-formed")
    assert tuned_iou > blind_iou + MARGIN, (tuned_iou, blind_iou)


def test_location_tokens_at_paligemma_s_ids_train_beside_lora(tmp_path):
    """A tokenizer laid out as HF's PaliGemma's (<loc0000> at 256000, <image> at 257152, 257,216 ids): the
    boxes are written with its ids, and `--lora-tokens locations` trains exactly rows 256000..257151, saved in
    peft's layout, and one step moves them (the head is tied: each row gets the softmax's gradient)."""
    from safetensors import safe_open

    from polymodal.train.trainer import TrainConfig, train

    (tmp_path / "hf").mkdir()
    write_hf_paligemma(tmp_path / "hf", paligemma_ids=True)
    write_jsonl(tmp_path, boxes(4, seed=0))
    train(TrainConfig(init_from=str(tmp_path / "hf"), data=str(tmp_path / "detect.jsonl"), out_dir=str(tmp_path),
                      name="ids", lora_rank=2, lora_tokens="locations", max_steps=1, batch_size=4, lr=1e-2,
                      warmup_steps=0, eval_every=10, checkpoint_every=1, log_every=10))
    [checkpoint] = (tmp_path / "ids" / "checkpoints").glob("step-*")
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == list(range(256000, 257152))
    with safe_open(checkpoint / "adapter_model.safetensors", framework="pt") as f:
        [key] = [k for k in f.keys() if k.endswith("trainable_tokens_delta")]
        rows = f.get_tensor(key)
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as f:
        base = f.get_tensor(next(k for k in f.keys() if k.endswith("embed_tokens.weight")))[256000:257152]
    assert rows.shape == (1152, 64) and bool((rows - base).abs().sum(1).gt(0).all())
