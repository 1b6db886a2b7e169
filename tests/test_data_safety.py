"""Nothing a user saved is lost: saves keep what they did not write, the swap leaves the old or the new
folder at every instant (a real child process killed at each file-system step), symlinks are followed,
checkpoints are ordered by step, a damaged newest checkpoint is named and skipped, Ctrl-C saves."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import polymodal as pm
from polymodal.cli import main
from polymodal.config import DecoderConfig
from polymodal.convert.hf import save_hf
from polymodal.data.documents import Document, Segment, write_jsonl
from polymodal.serialization import atomic_directory
from polymodal.train import checkpoint as ckpt

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny(seed=0):
    torch.manual_seed(seed)
    return pm.build(DecoderConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_seq_len=16))


def user_folder(path):
    """A training checkpoint as a user has it: optimizer and trainer state, a tokenizer, notes, a subfolder."""
    pm.save_pretrained(tiny(1), path)
    extras = {"optimizer.safetensors": b"optimizer state", "trainer.json": b'{"step": 7}',
              "tokenizer.json": b"{}", "README.md": b"my notes", "eval/scores.csv": b"1,2"}
    for name, data in extras.items():
        (path / name).parent.mkdir(exist_ok=True)
        (path / name).write_bytes(data)
    return extras


@pytest.mark.parametrize("writer", ["save_pretrained", "save_hf"])
def test_saving_over_a_checkpoint_keeps_every_file_it_does_not_write(tmp_path, writer):
    extras = user_folder(tmp_path / "ckpt")
    model = tiny(2)
    pm.save_pretrained(model, tmp_path / "ckpt") if writer == "save_pretrained" else save_hf(model, tmp_path / "ckpt", "llama")
    for name, data in extras.items():
        assert (tmp_path / "ckpt" / name).read_bytes() == data, name
    ids = torch.randint(0, 50, (1, 5))
    assert torch.equal(pm.from_pretrained(tmp_path / "ckpt")(ids).logits, model(ids).logits)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary or old folder left behind


def test_convert_in_place_is_refused_and_leaves_the_folder_as_it_was(tmp_path, capsys):
    user_folder(tmp_path / "ckpt")
    (tmp_path / "link").symlink_to(tmp_path / "ckpt")
    before = {p: p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    for target in ("ckpt", "link"):
        assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / target), "--to", "hf",
                     "--model-type", "llama"]) == 1
        err = capsys.readouterr().err
        assert "convert writes a new directory: the target" in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()} == before


def test_a_symlinked_target_is_resolved_first(tmp_path):
    user_folder(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    model = tiny(3)
    pm.save_pretrained(model, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "README.md").read_bytes() == b"my notes"
    ids = torch.randint(0, 50, (1, 5))
    assert torch.equal(pm.from_pretrained(tmp_path / "link")(ids).logits, model(ids).logits)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


SWAP_STEPS = ("os.link", "os.rename", "ctypes.dlsym", "shutil.rmtree")  # audit events around the swap


def save_killed_at(target, kill_at: int) -> int:
    """Saves into target in a forked child that SIGKILLs itself just before the kill_at-th swap step (0: never);
    returns the number of steps of a whole save, or -SIGKILL."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a real process, really killed
        steps = [0]

        def hook(event, args):
            if event in SWAP_STEPS:
                steps[0] += 1
                if steps[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        sys.addaudithook(hook)
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("new")
            (tmp / "model.safetensors").write_text("new")
        os.write(write, str(steps[0]).encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    out = os.read(read, 100)
    os.close(read)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else int(out)


def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_folder(tmp_path):
    def fresh():
        target = tmp_path / "ckpt"
        subprocess.run(["rm", "-rf", str(target), *map(str, tmp_path.glob(".ckpt*"))], check=True)
        (target / "sub").mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            (target / name).write_text("old")
        (target / "sub" / "keep.txt").write_text("mine")
        return target

    n_steps = save_killed_at(fresh(), 0)
    assert n_steps >= 3  # links of the kept files, the exchange (its symbol looked up), removing the old folder
    outcomes = set()
    for kill_at in range(1, n_steps + 1):
        assert save_killed_at(fresh(), kill_at) == -signal.SIGKILL
        target = tmp_path / "ckpt"
        state = {(target / n).read_text() for n in ("config.json", "model.safetensors")}
        assert state in ({"old"}, {"new"}), (kill_at, state)  # never missing, never a mix
        assert (target / "sub" / "keep.txt").read_text() == "mine"
        outcomes |= state
    assert outcomes == {"old", "new"}  # the kills landed on both sides of the swap


def test_checkpoints_are_ordered_by_step_past_a_million(tmp_path):
    for step in (5, 999_999, 1_000_000, 1_000_001):
        ckpt.step_dir(tmp_path, step).mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000005", "step-999999", "step-1000000",
                                                                  "step-1000001"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-1000001"
    ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1000000", "step-1000001"]


def test_ctrl_c_saves_at_the_step_boundary_and_resume_skips_a_damaged_checkpoint(tmp_path, capsys):
    """A real SIGINT to a real `polymodal train`; then the newest checkpoint is truncated, and --resume names
    the file and goes on from the checkpoint before it."""
    data = tmp_path / "data.jsonl"
    write_jsonl([Document([Segment("text", f"question {i}"), Segment("text", f"answer {i}", target=True)])
                 for i in range(32)], data)
    flags = ["--model", "llama-tiny", "--data", data, "--out-dir", tmp_path, "--name", "run", "--batch-size", 4,
             "--checkpoint-every", 2, "--keep-checkpoints", 3, "--eval-every", 10**6, "--log-every", 1]
    proc = subprocess.Popen([sys.executable, "-m", "polymodal.cli", "train", *map(str, flags), "--max-steps", "1000000"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 5/"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    m = re.fullmatch(r"polymodal train: interrupted at step (\d+)/1000000: saved checkpoint (\S+); continue with "
                     r"--resume\n", err)
    assert m, err
    step = int(m[1])
    newest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert step >= 5 and str(newest) == m[2] and newest.name == f"step-{step:06d}"
    assert json.loads((newest / "trainer.json").read_text())["step"] == step
    before = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-2]

    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a full disk
    with pytest.raises(pm.CheckpointError, match=f"{weights} is not a readable safetensors file"):
        pm.from_pretrained(newest)
    assert main(["train", "--out-dir", str(tmp_path), "--name", "run", "--resume", "--max-steps", str(step + 1)]) == 0
    out = capsys.readouterr().out
    assert f"cannot resume from {newest.name}: {weights} is not a readable safetensors file" in out
    assert f"resumed from {before} at step {int(before.name[5:])}" in out


def test_a_read_only_output_folder_is_one_line(tmp_path, capsys):
    target = "/sys/polymodal-test/model"  # sysfs: no one may create folders there, root included
    with pytest.raises(pm.CheckpointError, match=f"cannot write {target}: "):
        pm.save_pretrained(tiny(), target)
    pm.save_pretrained(tiny(), tmp_path / "m")
    assert main(["convert", str(tmp_path / "m"), target, "--to", "hf", "--model-type", "llama"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"polymodal convert: error: cannot write {target}: ") and err.count("\n") == 1


def test_an_interrupted_save_removes_its_temporary_folder_and_keeps_the_old(tmp_path):
    extras = user_folder(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(tmp_path / "ckpt") as tmp:
            (tmp / "config.json").write_text("partial")
            raise RuntimeError("disk full")
    assert (tmp_path / "ckpt" / "config.json").read_text() != "partial"
    assert all((tmp_path / "ckpt" / n).read_bytes() == d for n, d in extras.items())
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
