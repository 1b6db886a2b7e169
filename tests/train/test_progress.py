"""Stage progress (train/progress.py): one bar redrawn in place on a terminal, plain lines every tenth of the
way anywhere else."""

import io

from polymodal.train.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_bar_redrawn_in_place():
    out = Terminal()
    bar = Progress("VQ image tokenizer", 40, out)
    for i in range(1, 41):
        bar.update(i, f"loss {1 / i:.4f}")
    bar.close()
    text = out.getvalue()
    frames = text.split("\r")[1:]
    assert len(frames) == 40 and text.endswith("\n") and text.count("\n") == 1
    assert frames[19].startswith("VQ image tokenizer |" + "#" * 15 + "." * 15 + "| 20/40 | loss 0.0500")
    assert frames[-1].startswith("VQ image tokenizer |" + "#" * 30 + "| 40/40")


def test_a_log_gets_a_plain_line_each_tenth():
    out = io.StringIO()
    bar = Progress("VQ image tokenizer", 25, out)
    for i in range(1, 26):
        bar.update(i)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [int(line.split()[3].split("/")[0]) for line in lines] == [3, 5, 8, 10, 13, 15, 18, 20, 23, 25]
    assert "\r" not in out.getvalue() and all("eta" in line for line in lines)
