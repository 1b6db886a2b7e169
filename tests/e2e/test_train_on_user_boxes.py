"""A user trains a fresh detection/segmentation model on their own JSONL (objects with boxes and masks in its
targets) through `polymodal train --model paligemma-world --data FILE`: the run takes the world path's location
tokens (at the ids `train.locations.located` gives a BPE of the same text), fits the world path's mask VQ-VAE to
the file's masks and keeps it as `vae-oid.npz` beside each checkpoint, skips that stage on resume, and writes the
targets' boxes and masks as those tokens; `polymodal eval RUN --data` then scores boxes and masks. A dual encoder,
which has no place for objects, is refused before any work."""

import json
import re

import numpy as np
import pytest
import torch

import polymodal as pm
from polymodal.cli import main
from polymodal.data.documents import read_jsonl, with_media
from polymodal.data.lazy import document_texts
from polymodal.data.locations import LOC_TOKENS, SEG_TOKENS, box_to_bins, encode_mask
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.mask_vae import load_mask_vae, mask_vae_of
from polymodal.families.collators import make_collator
from polymodal.presets import get_preset
from polymodal.train.locations import WORLD_MASK_VAE, located, share_mask_vae
from polymodal.train.trainer import TrainConfig

QUIET = ["--batch-size", "4", "--warmup-steps", "1", "--eval-every", "10000", "--log-every", "10000",
         "--vq-steps", "20"]


def cli(capsys, *args) -> str:
    capsys.readouterr()
    assert main(list(map(str, args))) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-boxes")
    assert main(["export-data", str(root / "boxes.jsonl"), "--n", "24", "--tasks", "detect", "segment"]) == 0
    assert main(["export-data", str(root / "eval.jsonl"), "--n", "6", "--split", "eval", "--tasks", "detect",
                 "segment"]) == 0
    return root


def test_a_fresh_model_trains_on_a_users_boxes_and_masks_and_is_scored(files, tmp_path, capsys, one_thread):
    data = files / "boxes.jsonl"
    docs = read_jsonl(data, load_media=False)
    n_masks = sum(len(s.mask_sources) for d in docs for s in d.segments if s.mask_sources)
    out = cli(capsys, "train", "--model", "paligemma-world", "--data", data, "--max-steps", 2,
              "--out-dir", tmp_path, "--name", "boxes", *QUIET)
    # fitted to the file's masks, each once (a file of 24 documents is not read round again and again)
    assert re.search(rf"mask VQ-VAE fitted to {n_masks} training masks in 20 steps", out), out
    step2 = tmp_path / "boxes" / "checkpoints" / "step-000002"
    model, tokenizer = pm.from_pretrained(step2), Tokenizer.from_file(step2)

    # the world path's tokens and VAE: `located` on a BPE of the file's text gives the same ids and config
    world_tok = Tokenizer.train(document_texts(docs), TrainConfig().vocab_size)
    world_config = located(("detect", "segment"), get_preset("paligemma-world"), world_tok, fresh=True)
    located_ids = [tokenizer.token_id(t) for t in LOC_TOKENS + SEG_TOKENS]
    assert located_ids == [world_tok.token_id(t) for t in LOC_TOKENS + SEG_TOKENS]
    assert located_ids == list(range(tokenizer.vocab_size - 1152, tokenizer.vocab_size))
    assert model.config.mask_vae == world_config.mask_vae == WORLD_MASK_VAE
    assert model.config.text.vocab_size >= tokenizer.vocab_size

    # vae-oid.npz beside the weights is the model's (fitted, frozen) VAE
    vae = mask_vae_of(model)
    saved = load_mask_vae(step2 / "vae-oid.npz")
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in vae.state_dict().items())

    # each target writes its boxes' bins as <locNNNN> and its masks as the VAE's codes
    collator = make_collator(model.config, tokenizer)
    share_mask_vae(model, collator)
    seg = {tokenizer.token_id(t): i for i, t in enumerate(SEG_TOKENS)}
    for doc in docs[:4]:
        doc = with_media(doc, data)
        ids = collator.encode(doc).tokens["input_ids"]
        objects, size = doc.segments[-1], doc.images[0].size[::-1]
        bins = [tokenizer.token_id(LOC_TOKENS[b]) for _, box in objects.boxes for b in box_to_bins(box, size)]
        assert [i for i in ids if i in located_ids[:1024]] == bins
        codes = [c for (_, box), m in zip(objects.boxes, objects.masks or [])
                 for c in encode_mask(torch.from_numpy(np.asarray(m) > 127), box, vae)]
        assert [seg[i] for i in ids if i in seg] == codes

    # resumed: the stage is skipped and the VAE kept as it was
    out = cli(capsys, "train", "--model", "paligemma-world", "--data", data, "--max-steps", 3,
              "--out-dir", tmp_path, "--name", "boxes", "--resume", *QUIET)
    assert "resumed from" in out and "mask VQ-VAE" not in out, out
    again = load_mask_vae(tmp_path / "boxes" / "checkpoints" / "step-000003" / "vae-oid.npz")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in saved.state_dict().items())

    # polymodal eval RUN --data scores every object of the held-out file, masks too (the run's own VAE)
    out = cli(capsys, "eval", tmp_path / "boxes", "--data", files / "eval.jsonl", "--out", tmp_path / "eval")
    assert "box@0.5" in out and "masks not scored" not in out, out
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = {r["task"]: r for r in results["scores"]}
    assert results["masks"] == "scored" and results["training_data"] == str(data.resolve())
    held_out = read_jsonl(files / "eval.jsonl", load_media=False)
    assert rows["all"]["model"]["objects"] == sum(len(d.segments[-1].boxes) for d in held_out)
    assert len(rows["all"]["model"]["box_accuracy"]) == 2 and rows["segment"]["model"]["mask_iou"] is not None


def test_a_dual_encoder_is_refused_before_any_work(files, tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", "--model", "clip-tiny", "--data", str(files / "boxes.jsonl"), "--max-steps", "1",
                 "--out-dir", str(tmp_path), "--name", "clip"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "boxes.jsonl, line 1:" in err and "ContrastiveConfig" in err, err
    assert "dual encoder" in err and "paligemma" in err, err
    assert not (tmp_path / "clip").exists()


def test_export_data_shows_each_object_of_a_target(tmp_path, capsys):
    out = cli(capsys, "export-data", tmp_path / "few.jsonl", "--n", 3, "--tasks", "segment")
    first = json.loads((tmp_path / "few.jsonl").read_text().splitlines()[0])["segments"][-1]["boxes"]
    shown = " ; ".join(f"{o['label']} [{', '.join(f'{v:g}' for v in o['box'])}] (mask {o['mask']})" for o in first)
    assert f"-> '{shown}'" in out.splitlines()[1], out
