"""`polymodal eval RUN --data FILE` on a user's detection and segmentation documents (boxes in pixels, masks as a PNG
file, COCO polygons, COCO RLE with list counts and with the compressed string; images of several sizes), scored as
the world's eval scores them. The model is a real checkpoint whose greedy answer to any prompt is set by hand
(tests/scripted_paligemma.py): one object with its box and mask, so that each document's IoUs are known in advance
and the figures are checked against the same figures computed here from predictions.jsonl's answers and the masks
this file drew."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from detection_data import compressed_counts, iou, mask_runs
from PIL import Image
from scripted_paligemma import SIDE, write_scripted_paligemma

import polymodal as pm
from polymodal.cli import main
from polymodal.data.locations import format_object
from polymodal.data.masks import fill_polygon
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.mask_vae import mask_vae_npz, mask_vae_of
from polymodal.families.collators import fit_to_tokenizer
from polymodal.presets import get_preset
from polymodal.train.locations import WORLD_MASK_VAE

# a tiny model answers fastest, and steadily under load, on one thread
pytestmark = pytest.mark.usefixtures("one_thread")
BOX = (4, 6, 20, 30)  # the answer's box in the pixels of a SIDE x SIDE image; bins scale it to other sizes
CODES = [i if i % 4 < 2 else 64 + i for i in range(16)]  # the left half of the box's code grid inside
ANSWER = format_object(BOX, SIDE, "red shape", CODES)
# per document: (width, height) of its image, task, objects as (label, polygon, form of the mask)
DOCUMENTS = [((32, 32), "near", [("red shape", (4, 6, 20, 6, 20, 30, 4, 30), "file")]),  # the answer's own box
             ((64, 48), "near", [("red shape", (18, 9, 46, 9, 46, 45), "polygons")]),  # overlapping it
             ((40, 40), "far", [("red shape", (30, 2, 38, 2, 38, 10, 30, 10), "rle")]),  # disjoint from it
             ((32, 32), "far", [("blue shape", (2, 2, 12, 2, 12, 12), "compressed"),  # a label the answer lacks
                                ("red shape", (6, 8, 18, 8, 18, 28, 6, 28), "file")])]


def mask_field(mask: np.ndarray, form: str, polygon, directory, name: str):
    if form == "file":
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(directory / f"{name}.png")
        return f"{name}.png"
    if form == "polygons":
        return [list(polygon)]
    counts = mask_runs(mask)
    return {"size": list(mask.shape), "counts": compressed_counts(counts) if form == "compressed" else counts}


def box_of(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def write_documents(directory, documents=DOCUMENTS, name="data.jsonl") -> list[list[tuple[str, np.ndarray]]]:
    """The documents as JSONL with their images; returns each document's objects as (label, mask)."""
    lines, truth = [], []
    for i, ((width, height), task, objects) in enumerate(documents):
        World(seed=0).draw("red", "square").resize((width, height)).save(directory / f"{i}.png")
        fields, kept = [], []
        for k, (label, polygon, form) in enumerate(objects):
            mask = fill_polygon(list(polygon), width, height)
            fields.append({"label": label, "box": box_of(mask),
                           "mask": mask_field(mask, form, polygon, directory, f"mask-{i}-{k}")})
            kept.append((label, mask))
        lines.append({"id": f"d{i}", "task": task, "segments": [
            {"image": f"{i}.png"}, {"text": "segment " + " ; ".join(o[0] for o in objects)},
            {"boxes": fields, "target": True}]})
        truth.append(kept)
    (directory / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return truth


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-boxes")
    write_scripted_paligemma(root / "segmenter", ANSWER, WORLD_MASK_VAE)
    write_scripted_paligemma(root / "no-vae", ANSWER)
    return root, write_documents(root)


def evaluate(run, data, out, capsys):
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--out", str(out)]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return records, json.loads((out / "results.json").read_text()), capsys.readouterr().out


def expected(records, truth, vae) -> list[tuple[list[float], list[float] | None, bool]]:
    """Per document, from its answer as predictions.jsonl gives it: each reference's box and mask IoU (the answer's
    first unmatched object of the label; 0 when none), and whether the answer is invalid."""
    out = []
    for r, objects in zip(records, truth):
        height, width = objects[0][1].shape
        parsed = pm.parse_locations(r["prediction"], (height, width), vae, boxes_only=vae is None)
        found, boxes, masks = list(parsed.objects), [], []
        for label, mask in objects:
            got = next((o for o in found if o.label == label), None)
            if got is not None:
                found.remove(got)
            boxes.append(iou(got.box, box_of(mask)) if got else 0.0)
            if vae is not None and got is not None:
                masks.append((got.mask.numpy() & mask).sum() / (got.mask.numpy() | mask).sum())
            elif vae is not None:
                masks.append(0.0)
        invalid = parsed.malformed > 0 or not parsed.objects or (vae is not None and
                                                                  any(o.mask is None for o in parsed.objects))
        out.append((boxes, masks if vae is not None else None, invalid))
    return out


def check_rows(rows, records, want, masks: bool):
    for row in rows:
        idx = [i for i, r in enumerate(records) if row["task"] in ("all", r["task"])]
        boxes = [b for i in idx for b in want[i][0]]
        assert row["n"] == len(idx) and row["model"]["objects"] == len(boxes)
        assert row["model"]["box_accuracy"] == pytest.approx([np.mean([b >= t for b in boxes]) for t in (0.5, 0.75)])
        assert row["score"] == row["model"]["box_accuracy"][0]
        assert row["model"]["invalid"] == sum(want[i][2] for i in idx)
        if masks:
            assert row["model"]["mask_iou"] == pytest.approx(np.mean([m for i in idx for m in want[i][1]]))
        else:
            assert row["model"]["mask_iou"] is None
        assert row["blanked"] == row["model"]  # the scripted answer does not look at the image
    assert sorted(r["task"] for r in rows) == ["all", "far", "near"]


def test_boxes_and_masks_of_a_users_file_are_scored_as_the_world_s(root, tmp_path, capsys):
    root, truth = root
    records, results, said = evaluate(root / "segmenter", root / "data.jsonl", tmp_path / "out", capsys)
    assert results["metric"] == "boxes" and results["masks"] == "scored"  # chosen because the targets hold objects
    assert [r["prediction"] for r in records] == [ANSWER] * len(DOCUMENTS)
    vae = mask_vae_of(pm.from_pretrained(root / "segmenter"))
    want = expected(records, truth, vae)
    for r, (boxes, masks, invalid), objects in zip(records, want, truth):
        assert r["box_iou"] == pytest.approx(boxes) and r["mask_iou"] == pytest.approx(masks)
        assert r["invalid"] == invalid and r["score"] == pytest.approx(np.mean([b >= 0.5 for b in boxes]))
        assert r["references"] == [{"label": label, "box": box_of(mask)} for label, mask in objects]
    # what the documents were drawn to give: the answer's own box, an overlap (found at IoU 0.5, not 0.75), a
    # disjoint box, a label the answer lacks beside an overlap
    assert want[0][0][0] > 0.95 and 0.5 < want[1][0][0] < 0.75 and want[2][0][0] == 0
    assert want[3][0][0] == 0 and 0 < want[3][0][1] < 1
    assert all(0 < m < 1 for m in want[0][1]) and not any(w[2] for w in want)
    check_rows(results["scores"], records, want, masks=True)
    assert "box@0.5" in said and "mask IoU" in said and "not scored" not in said


def test_without_a_mask_vae_the_boxes_are_scored_and_the_masks_said_not_to_be(root, tmp_path, capsys):
    root, truth = root
    records, results, said = evaluate(root / "no-vae", root / "data.jsonl", tmp_path / "out", capsys)
    assert results["masks"].startswith("not scored: the model holds no mask VQ-VAE")
    assert "masks not scored: the model holds no mask VQ-VAE" in said
    want = expected(records, truth, None)
    assert [b for r in records for b in r["box_iou"]] == pytest.approx([b for w in want for b in w[0]])
    assert all(r["mask_iou"] is None and not r["invalid"] for r in records)
    check_rows(results["scores"], records, want, masks=False)


def test_a_vae_oid_npz_beside_the_weights_decodes_the_masks(root, tmp_path, capsys):
    """The model without a VAE, given the segmenter's as vae-oid.npz beside its weights (where an HF export or a
    LoRA run keeps it), scores the masks as the segmenter does."""
    root, _ = root
    shutil.copytree(root / "no-vae", tmp_path / "joined")
    (tmp_path / "joined" / "vae-oid.npz").write_bytes(mask_vae_npz(mask_vae_of(pm.from_pretrained(root / "segmenter"))))
    _, joined, said = evaluate(tmp_path / "joined", root / "data.jsonl", tmp_path / "out", capsys)
    _, own, _ = evaluate(root / "segmenter", root / "data.jsonl", tmp_path / "own", capsys)
    assert joined["masks"] == "scored" and "not scored" not in said
    assert joined["scores"] == own["scores"] and own["scores"][0]["model"]["mask_iou"] > 0


def test_a_run_trained_on_a_file_has_the_majority_box_of_its_training_objects(root, tmp_path, capsys):
    """The run's training file (here the same documents) gives each label its mean box as a share of the image's
    sides; each document's guess is that box at its image's size, for the labels it asks for."""
    root, truth = root
    assert main(["train", "--init-from", str(root / "segmenter"), "--data", str(root / "data.jsonl"), "--max-steps",
                 "1", "--lr", "1e-9", "--min-lr", "0", "--batch-size", "2", "--warmup-steps", "1", "--eval-every",
                 "1000", "--log-every", "1000", "--out-dir", str(tmp_path), "--name", "tuned"]) == 0
    records, results, said = evaluate(tmp_path / "tuned", root / "data.jsonl", tmp_path / "out", capsys)
    shares = {}
    for objects in truth:
        for label, mask in objects:
            (height, width), (x1, y1, x2, y2) = mask.shape, box_of(mask)
            shares.setdefault(label, []).append((x1 / width, y1 / height, x2 / width, y2 / height))
    guessed = []
    for objects in truth:
        height, width = objects[0][1].shape
        guessed.append([iou(np.mean(shares[label], axis=0) * [width, height, width, height], box_of(mask))
                        for label, mask in objects])
    for row in results["scores"]:
        boxes = [b for i, r in enumerate(records) if row["task"] in ("all", r["task"]) for b in guessed[i]]
        assert row["majority"]["box_accuracy"] == pytest.approx([np.mean([b >= t for b in boxes]) for t in (0.5, 0.75)])
        assert 0 < row["majority"]["mask_iou"] < 1 and row["majority"]["invalid"] == 0
    assert len({tuple(r["majority"]["box_accuracy"]) for r in results["scores"]}) > 1  # the tasks' guesses differ
    assert "majority" in said


def test_on_the_world_s_own_scenes_the_figures_are_the_world_eval_s(tmp_path, capsys):
    """The world's held-out detect and segment scenes, written by `polymodal export-data`, scored by `eval --data`
    give the figures `polymodal eval` gives on the same scenes: one matcher, one reading of the answers. The scripted answer is the first segment scene's object, so some objects are found."""
    from polymodal.data.synthetic import WORLD
    from polymodal.evaluate import evaluate as world_eval

    label, box = WORLD.sample("segment", 0, "eval").document.segments[-1].boxes[0]
    write_scripted_paligemma(tmp_path / "m", format_object(box, SIDE, label, CODES), WORLD_MASK_VAE)
    model, tokenizer = pm.from_pretrained(tmp_path / "m"), Tokenizer.from_file(tmp_path / "m")
    world = {s.task: s for s in world_eval(model, tokenizer, ("detect", "segment"), 12, WORLD, baselines=False)}
    for task in ("detect", "segment"):
        assert main(["export-data", str(tmp_path / f"{task}.jsonl"), "--n", "12", "--split", "eval", "--tasks", task]) == 0
        _, results, _ = evaluate(tmp_path / "m", tmp_path / f"{task}.jsonl", tmp_path / task, capsys)
        [row] = [r for r in results["scores"] if r["task"] == task]
        assert row["model"] == json.loads(json.dumps(dataclasses.asdict(world[task].model)))  # as results.json has it
    assert world["segment"].model.box_accuracy[0] > 0 and world["segment"].model.mask_iou > 0


def refused(run, data, out, capsys) -> str:
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--out", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("using ")]
    assert len(err) == 1 and not out.exists(), err
    return err[0]


@pytest.mark.parametrize("bad, says", [
    (lambda line: {**line, "segments": [*line["segments"][:2], {"text": "red shape", "target": True}]},
     "line 2, segments[2]: expected a target of objects"),
    (lambda line: {**line, "segments": [*line["segments"][:2], {"boxes": [
        {"label": "red shape", "box": [4, 6, 20, 40]}], "target": True}]},
     "line 2, segments[2].boxes[0].box: box (4.0, 6.0, 20.0, 40.0) must satisfy 0 <= x1 < x2 <= width"),
    (lambda line: {**line, "segments": [*line["segments"][:2], {"boxes": [
        {"label": "red shape", "box": [4, 6, 20, 30], "mask": {"size": [16, 16], "counts": [256]}}], "target": True}]},
     "line 2, segments[2].boxes[0].mask: expected a mask of the image's size (height, width) = (32, 32), got (16, 16)"),
])
def test_a_bad_reference_is_one_line_naming_file_line_and_field_and_nothing_is_written(root, tmp_path, capsys,
                                                                                       bad, says):
    root, _ = root
    lines = [json.loads(line) for line in (root / "data.jsonl").read_text().splitlines()]
    lines[1] = bad(lines[0])  # line 2: the first document's image, its target spoiled
    (root / "bad.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    said = refused(root / "segmenter", root / "bad.jsonl", tmp_path / "out", capsys)
    assert f"bad.jsonl, {says}" in said, said


def test_a_model_that_writes_boxes_as_text_is_told_to_score_them_as_text(root, tmp_path, capsys):
    root, _ = root
    tokenizer = Tokenizer.train(World(seed=0).texts(), vocab_size=320)  # no location tokens
    pm.save_pretrained(pm.build(fit_to_tokenizer(get_preset("paligemma-tiny"), tokenizer)), tmp_path / "plain")
    tokenizer.save(tmp_path / "plain")
    said = refused(tmp_path / "plain", root / "data.jsonl", tmp_path / "out", capsys)
    assert "--metric boxes (the default: the targets hold objects) scores answers written as location tokens" in said
    assert "--metric exact" in said
