"""The one progress display (polymodal/progress.py): a bar redrawn in place on a terminal, a plain line each
tenth of the way anywhere else; `polymodal eval` shows it on stderr, its header saying when the weights are
quantized (the VQ stage's lines in a training log: tests/e2e/test_generate_defaults.py)."""

import io

import pytest

from polymodal.cli import main
from polymodal.progress import WIDTH, Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_bar_redrawn_in_place():
    out = Terminal()
    bar = Progress(40, "VQ image tokenizer", out)
    for i in range(1, 41):
        bar.update(1, f"loss {1 / i:.4f}")
    bar.close()  # after the end: no second newline
    text = out.getvalue()
    frames = text.split("\r")[1:]
    assert len(frames) == 40 and text.endswith("\n") and text.count("\n") == 1
    half = WIDTH // 2
    assert frames[19].startswith(f"VQ image tokenizer  50%|{'#' * half}{' ' * (WIDTH - half)}| 20/40 | loss 0.0500")
    assert frames[-1].startswith(f"VQ image tokenizer 100%|{'#' * WIDTH}| 40/40")


def test_a_bar_stopped_short_is_closed_on_its_own_line():
    out = Terminal()
    bar = Progress(10, "answers", out)
    bar.update(3)
    bar.close()
    assert out.getvalue().count("\n") == 1 and out.getvalue().endswith("\n") and "3/10" in out.getvalue()


def test_a_log_gets_a_plain_line_each_tenth():
    out = io.StringIO()
    bar = Progress(25, "answers", out)
    for _ in range(25):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [3, 5, 8, 10, 13, 15, 18, 20, 23, 25]
    assert "\r" not in out.getvalue() and all("eta" in line for line in lines)


def test_big_steps_print_one_line_each_not_one_per_tenth():
    out = io.StringIO()
    bar = Progress(1000, "answers", out)
    for _ in range(4):
        bar.update(250)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["250/1000", "500/1000", "750/1000", "1000/1000"]


def test_world_eval_shows_progress_and_says_when_quantized(tmp_path, capsys, one_thread):
    pytest.importorskip("torchao")
    assert main(["train", "--model", "paligemma-tiny", "--tasks", "colour", "--max-steps", "2", "--batch-size", "4",
                 "--eval-every", "1000", "--out-dir", str(tmp_path), "--name", "run"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--n", "4", "--quantize", "int8"]) == 0
    out, err = capsys.readouterr()
    assert "(loaded int8 weight-only quantized)" in out.splitlines()[0]
    assert err.splitlines()[-1].startswith("colour 8/8")  # 4 answers, then 4 with blank images
