"""The evaluation progress display: a bar redrawn in place on a terminal, a few plain lines in a log; and
`polymodal eval` on the built-in world shows it on stderr, its header saying when the weights are quantized."""

import io

import pytest

from polymodal.cli import main
from polymodal.evaluate.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_at_most_eleven_plain_lines_ending_at_the_total():
    log = io.StringIO()
    bar = Progress(1000, "answers", log)
    for _ in range(250):
        bar.update(4)
    lines = log.getvalue().splitlines()
    assert 2 <= len(lines) <= 11 and "\r" not in log.getvalue()
    assert all(line.startswith("answers: ") for line in lines) and lines[-1].startswith("answers: 1000/1000")


def test_a_terminal_gets_one_line_redrawn_in_place():
    term = Terminal()
    bar = Progress(10, "images", term)
    for _ in range(10):
        bar.update(1)
    text = term.getvalue()
    assert text.count("\r") == 10 and text.count("\n") == 1 and text.endswith("\n")
    assert "100%|" + "#" * 24 + "| 10/10" in text.splitlines()[-1].split("\r")[-1]


def test_world_eval_shows_progress_and_says_when_quantized(tmp_path, capsys, one_thread):
    pytest.importorskip("torchao")
    assert main(["train", "--model", "paligemma-tiny", "--tasks", "colour", "--max-steps", "2", "--batch-size", "4",
                 "--eval-every", "1000", "--out-dir", str(tmp_path), "--name", "run"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--n", "4", "--quantize", "int8"]) == 0
    out, err = capsys.readouterr()
    assert "(loaded int8 weight-only quantized)" in out.splitlines()[0]
    assert err.splitlines()[-1].startswith("colour: 8/8")  # 4 answers, then 4 with blank images
