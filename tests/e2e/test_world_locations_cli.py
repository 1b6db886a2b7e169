"""Segmentation from the command line: `polymodal train --tasks segment` fits the mask VQ-VAE before the decoder
trains (tests/train/test_mask_vae_stage.py: once, saved, restored on resume); `polymodal eval` prints box accuracy
at IoU 0.5 / 0.75, mean mask IoU and invalid answers beside the majority box and blanked images."""

import re

from polymodal.cli import main

# segment alone: its answers hold boxes too, and each task costs the trainer's eval a batch of long answers
TRAIN = ["train", "--model", "paligemma-tiny", "--tasks", "segment", "--vq-steps", "20", "--eval-every",
         "1000", "--eval-docs", "8", "--batch-size", "4"]


def test_train_then_eval_prints_box_accuracy_mask_iou_and_invalid_answers_beside_the_baselines(tmp_path, capsys):
    assert main([*TRAIN, "--max-steps", "3", "--out-dir", str(tmp_path), "--name", "det"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"mask VQ-VAE fitted to \d+ training masks in 20 steps", out), out

    assert main(["eval", str(tmp_path / "det"), "--n", "4"]) == 0
    table = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(table) if line.split()[:3] == ["task", "n", "answers"])
    assert table[header].split()[3:] == ["box@0.5", "box@0.75", "mask", "IoU", "invalid"]
    rows = [line.split() for line in table[header + 1:]]
    assert [r[:3] for r in rows] == [["segment", "4", b] for b in ("model", "majority", "blanked")]
    for row in rows:
        assert all(0 <= float(a.rstrip("%")) <= 100 for a in row[3:5]) and 0 <= float(row[5]) <= 1, row
    assert all(0 <= int(r[6]) <= 4 for r in rows) and rows[1][6] == "0"  # the majority box always parses
