"""The user's path to segmentation (issue #31's leftovers): a JSONL whose objects give their masks in every form
polymodal reads (a PNG file, COCO polygons, COCO RLE with list counts and with the compressed string), trained on
by `polymodal train` with LoRA and `--lora-tokens locations` on a tiny HF PaliGemma (written by transformers),
the mask VQ-VAE given as a `vae-oid.npz` file (`--mask-vae`) or found beside the HF weights where `polymodal
convert --to hf` wrote it. The training targets hold, for each object, the 16 segmentation tokens that VAE gives
for its mask. A few steps each: what is checked is the data path, not what the model learns."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import polymodal as pm
from polymodal.cli import main
from polymodal.data.documents import read_jsonl, with_media
from polymodal.data.masks import fill_polygon
from polymodal.data.locations import SEG_TOKENS, crop_mask, encode_mask
from polymodal.encoders.mask_vae import MaskVAE, load_mask_vae, mask_vae_npz, mask_vae_of, train_mask_vae
from polymodal.train.distributed import init_process
from polymodal.train.locations import WORLD_MASK_VAE
from polymodal.train.trainer import TrainConfig, setup

from detection_data import SIDE, mask_in_each_form, scene, write_hf_paligemma

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FORMS = ("file", "polygons", "rle", "compressed")
# one triangle per document, each pointing another way inside its box, so that their codes differ
TRIANGLES = [(2, 3, 14, 3, 2, 15), (16, 2, 28, 2, 28, 14), (4, 17, 16, 29, 4, 29), (18, 28, 30, 16, 30, 28),
             (10, 10, 22, 10, 16, 22)]
QUIET = ["--batch-size", 2, "--warmup-steps", 1, "--eval-every", 10_000, "--checkpoint-every", 10_000,
         "--log-every", 10_000]
LORA = ["--lora-rank", 4, "--lora-tokens", "locations", "--max-steps", 3, "--lr", 1e-3, *QUIET]


def run(*args) -> str:
    done = subprocess.run([sys.executable, "-m", "polymodal.cli", *map(str, args)], env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def refused(capsys, *args) -> str:
    """What `polymodal ARGS` (run in this process: refusals come before any work) says on failing."""
    assert main(list(map(str, args))) == 1
    return capsys.readouterr().err


def triangle_mask(points) -> np.ndarray:
    """The triangle's pixels (COCO polygons' rule, tested against pycocotools in tests/data/test_mask_documents.py)."""
    return fill_polygon(list(points), SIDE, SIDE)


def box_of(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def write_documents(directory) -> list[tuple[np.ndarray, list[int]]]:
    """data.jsonl: one document per form (its mask given that way), then one with two objects (compressed RLE
    and a file); returns each object's (mask, box) in order."""
    lines, truth = [], []
    for i, points in enumerate(TRIANGLES):
        masks = [triangle_mask(points)] + ([triangle_mask(TRIANGLES[0])] if i == len(FORMS) else [])
        objects = []
        for k, (form, mask) in enumerate(zip([FORMS[i]] if i < len(FORMS) else ["compressed", "file"], masks)):
            given = mask_in_each_form(mask, directory, f"mask-{i}-{k}")
            box = box_of(mask)
            objects.append({"label": "red shape", "box": box,
                            "mask": [list(points)] if form == "polygons" else given[form]})
            truth.append((mask, box))
        scene(box_of(np.logical_or.reduce(masks))).save(directory / f"{i}.png")
        lines.append({"segments": [{"image": f"{i}.png"}, {"text": "segment red shape"},
                                   {"boxes": objects, "target": True}]})
    (directory / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return truth


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny random HF PaliGemma (no mask VQ-VAE), the documents, and a mask VQ-VAE of the world's size in a
    file of big_vision's layout."""
    root = tmp_path_factory.mktemp("segment")
    (root / "hf").mkdir()
    write_hf_paligemma(root / "hf")
    truth = write_documents(root)
    torch.manual_seed(0)
    vae = MaskVAE(WORLD_MASK_VAE)  # fitted a little to the masks, so that their codes differ (a random one's do not)
    crops = torch.stack([crop_mask(torch.from_numpy(mask), box, WORLD_MASK_VAE.mask_size) for mask, box in truth])
    train_mask_vae(vae, crops.repeat(8, 1, 1), steps=20, batch_size=8)
    (root / "vae.npz").write_bytes(mask_vae_npz(vae))
    return root, truth


def targets(config: TrainConfig, data) -> list[list[int]]:
    """The codes of the segmentation tokens each document's labels hold, as the trainer's own setup lays the
    documents out (its model's VAE coding the masks)."""
    built = setup(config, init_process("cpu"), [])
    seg = {built.tokenizer.token_id(t): i for i, t in enumerate(SEG_TOKENS)}
    out = []
    for doc in read_jsonl(data, load_media=False):
        labels = built.collator.encode(with_media(doc, data)).tokens["labels"]
        out.append([seg[i] for i in labels if i in seg])
    return out


def expected(truth, vae) -> list[list[int]]:
    codes = [encode_mask(torch.from_numpy(mask), box, vae) for mask, box in truth]
    return [*codes[:len(FORMS)], codes[len(FORMS)] + codes[len(FORMS) + 1]]


def test_lora_training_on_masks_in_every_form_writes_the_given_vaes_codes(root, tmp_path):
    root, truth = root
    data = root / "data.jsonl"
    log = run("train", "--init-from", root / "hf", "--data", data, "--mask-vae", root / "vae.npz", "--out-dir",
              tmp_path, "--name", "seg", *LORA)
    assert "trainable: LoRA rank 4" in log
    vae = load_mask_vae(root / "vae.npz")
    want = expected(truth, vae)
    assert len({tuple(c) for c in want}) == len(want)  # the masks' codes differ: a mix-up would show
    settings = dict(init_from=str(root / "hf"), data=str(data), mask_vae=str(root / "vae.npz"), lora_rank=4,
                    lora_tokens="locations", max_steps=3, batch_size=2, out_dir=str(tmp_path), name="targets")
    got = targets(TrainConfig(**settings), data)
    assert got == want and all(len(c) == 16 for c in want[:len(FORMS)])
    # the checkpoint keeps the VAE beside the adapter (the base directory has none), where loading finds it
    checkpoint = tmp_path / "seg" / "checkpoints" / "step-000003"
    from polymodal.train.trainer import load_base
    kept = mask_vae_of(load_base(str(checkpoint)))
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in vae.state_dict().items())


def test_without_a_mask_vae_the_masks_are_refused_before_training(root, tmp_path, capsys):
    root, _ = root
    said = refused(capsys, "train", "--init-from", root / "hf", "--data", root / "data.jsonl", "--out-dir", tmp_path,
                   "--name", "none", *LORA)
    assert "data.jsonl, line 1: " in said and "no mask VQ-VAE" in said and "--mask-vae" in said
    assert not (tmp_path / "none" / "checkpoints").exists()


def test_the_hf_export_writes_vae_oid_npz_and_training_from_it_finds_the_vae(root, tmp_path):
    """A model holding a mask VQ-VAE (the HF PaliGemma given one) exported to HF writes it as vae-oid.npz beside
    the weights; `pm.from_pretrained` (quantized too), `convert --to polymodal` and `--init-from` on that
    directory find it (equal tensors), and training on the masks codes them with it."""
    root, truth = root
    from polymodal.convert.hf_export import export_hf
    from polymodal.data.tokenizer import Tokenizer
    from polymodal.train.trainer import load_base

    model = load_base(str(root / "hf"), mask_vae=load_mask_vae(root / "vae.npz"))
    vae = mask_vae_of(model)
    export_hf(model, Tokenizer.from_file(root / "hf"), tmp_path / "hf-vae")
    assert (tmp_path / "hf-vae" / "vae-oid.npz").is_file()
    assert not list(tmp_path.glob(".*"))  # written inside the one atomic directory swap
    assert mask_vae_of(pm.from_pretrained(tmp_path / "hf-vae", quantize="int8")) is not None
    for loaded in (load_base(str(tmp_path / "hf-vae")), pm.from_pretrained(tmp_path / "hf-vae"), None):
        if loaded is None:
            run("convert", "--to", "polymodal", tmp_path / "hf-vae", tmp_path / "back")
            loaded = pm.from_pretrained(tmp_path / "back")
        state = mask_vae_of(loaded).state_dict()
        assert state.keys() == vae.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in vae.state_dict().items())
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    settings = dict(init_from=str(tmp_path / "hf-vae"), data=str(root / "data.jsonl"), max_steps=1, batch_size=2,
                    out_dir=str(tmp_path), name="own")
    got = targets(TrainConfig(**settings), root / "data.jsonl")
    assert got == expected(truth, vae)


def test_a_fresh_model_given_a_mask_vae_keeps_it_rather_than_fitting_one(root, tmp_path, capsys):
    from detection_data import write_tokenizer
    from polymodal.train.trainer import train

    root, truth = root
    (tmp_path / "tok").mkdir()
    write_tokenizer(tmp_path / "tok", paligemma_ids=False)
    config = TrainConfig(model="paligemma-tiny", tokenizer=str(tmp_path / "tok"), data=str(root / "data.jsonl"),
                         mask_vae=str(root / "vae.npz"), max_steps=1, batch_size=2, vq_steps=5, out_dir=str(tmp_path),
                         name="fresh")
    run_dir = train(config)
    assert "mask VQ-VAE fitted" not in capsys.readouterr().out
    kept = mask_vae_of(pm.from_pretrained(run_dir)).state_dict()
    assert all(torch.equal(kept[k], v) for k, v in load_mask_vae(root / "vae.npz").state_dict().items())
    got = targets(config.replace(name="fresh-targets"), root / "data.jsonl")
    assert got == expected(truth, load_mask_vae(root / "vae.npz"))


def test_a_family_without_location_tokens_refuses_masks_before_training(root, tmp_path, capsys):
    root, _ = root
    said = refused(capsys, "train", "--model", "gemini-tiny", "--data", root / "data.jsonl", "--out-dir", tmp_path,
                   "--name", "g", "--max-steps", 1)
    assert "data.jsonl, line 1: its objects have masks, which a GeminiConfig model has no place for" in said
    assert not (tmp_path / "g" / "checkpoints").exists()


def test_a_bad_mask_vae_file_is_refused_by_name(root, tmp_path, capsys):
    root, _ = root
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for given, says in ((tmp_path / "gone.npz", "gone.npz does not exist"), (tmp_path / "junk.npz", "not a readable")):
        said = refused(capsys, "train", "--init-from", root / "hf", "--data", root / "data.jsonl", "--mask-vae",
                       given, "--out-dir", tmp_path, "--name", "bad", *LORA)
        assert says in said, said
