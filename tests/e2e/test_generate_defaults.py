"""Generation settings that fit the model, through the command line: a drawing model's default
--max-new-tokens leaves room for an image, a budget cut inside one says so, PaliGemma without an image is
an error; and the VQ stage before a drawing model's training shows its progress as plain lines in a log."""

import os
import subprocess
import sys

import pytest
from PIL import Image

from polymodal.cli import main
from polymodal.data.synthetic import World

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PROMPT = "draw a red circle in the top left"


@pytest.fixture(scope="module")
def drawing_run(tmp_path_factory):
    """chameleon-tiny trained briefly on text -> image (enough to open an image after a prompt)."""
    home = tmp_path_factory.mktemp("cham")
    out = subprocess.run([sys.executable, "-m", "polymodal.cli", "train", "--model", "chameleon-tiny", "--tasks",
                          "text_to_image", "--vq-steps", "20", "--max-steps", "40", "--lr", "3e-3", "--eval-every",
                          "40", "--out-dir", str(home), "--name", "cham"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    return home / "cham", out.stdout


def test_the_vq_stage_prints_progress_lines_when_not_on_a_terminal(drawing_run):
    _, stdout = drawing_run
    lines = [line for line in stdout.splitlines() if line.startswith("VQ image tokenizer")]
    steps = [int(line.split()[3].split("/")[0]) for line in lines[:-1]]
    assert steps == [2 * i for i in range(1, 11)], lines  # a line each tenth of the 20 steps
    assert all("\r" not in line and "eta" in line and "loss" in line for line in lines[:-1])
    assert lines[-1].startswith("VQ image tokenizer fitted to")


def test_a_drawing_model_draws_with_the_default_budget(drawing_run, tmp_path, capsys):
    run, _ = drawing_run
    assert main(["generate", str(run), "--prompt", PROMPT, "--image-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert f"wrote {tmp_path / 'out' / 'image_0.png'}" in out.out
    assert all(line.startswith("using ") for line in out.err.splitlines()), out.err  # only the checkpoint chosen
    assert Image.open(tmp_path / "out" / "image_0.png").size[0] > 0

    assert main(["generate", str(run), "--prompt", PROMPT, "--image-dir", str(tmp_path / "cut"),
                 "--max-new-tokens", "20"]) == 0
    err = capsys.readouterr().err
    assert "an image was begun but not finished: --max-new-tokens 20 ran out inside it" in err, err
    assert not (tmp_path / "cut").exists()


def test_paligemma_without_an_image_is_an_error(tmp_path, capsys):
    from polymodal.families.collators import fit_to_tokenizer
    from polymodal.data.tokenizer import Tokenizer
    from polymodal.presets import get_preset
    import polymodal as pm

    tokenizer = Tokenizer.train(World(seed=0).texts(), vocab_size=400)
    pm.save_pretrained(pm.build(fit_to_tokenizer(get_preset("paligemma-tiny"), tokenizer)), tmp_path / "pg")
    tokenizer.save(tmp_path / "pg")
    assert main(["generate", str(tmp_path / "pg"), "--prompt", "what colour is the shape?"]) == 1
    err = capsys.readouterr().err
    assert "is a PaliGemma, which answers about an image: give --image FILE" in err and len(err.splitlines()) == 1
