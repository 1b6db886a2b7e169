import collections
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from polymodal.train.checkpoint import list_checkpoints

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Training loops on tiny matrices run fastest, and steadily under load, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def open_gates():
    """open(model): a Flamingo's gates opened and its media path's weights made large enough that images change
    its answers, in place (a fresh Flamingo is its LM alone, which would hide every media bug)."""
    def open_(model):
        with torch.no_grad():
            for block in model.cross_layers:
                block.attn_gate.fill_(0.8)
                block.mlp_gate.fill_(-0.6)
            for weight in [*model.cross_layers.parameters(), *model.perceiver.parameters()]:
                if weight.dim() == 2:
                    weight.normal_(std=0.1)
        return model
    return open_


@pytest.fixture
def torchrun():
    """run(*args): `torchrun` with 2 processes (gloo, CPU; `nproc` for another number) on a free local port,
    then args (a script and its arguments, or -m module ...); the test fails with the processes' output if they fail."""
    def run(*args, timeout: int = 300, cwd=None, nproc: int = 2) -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port), *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc
    return run


@pytest.fixture
def kill_at_first_checkpoint():
    """run(cmd, run_dir): starts a training command (one thread a process) and kill -9s it as soon as a
    checkpoint appears in run_dir; returns the checkpoints it left."""
    def run(cmd, run_dir):
        proc = subprocess.Popen([*map(str, cmd)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not list_checkpoints(run_dir / "checkpoints") and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        return list_checkpoints(run_dir / "checkpoints")
    return run


def pytest_terminal_summary(terminalreporter):
    """The hostile sweep's count of probes passed per expected outcome (tests/sweep/sweep_judge.py)."""
    counts = collections.Counter()
    for report in terminalreporter.stats.get("passed", []):
        if "sweep" in report.nodeid and "[" in report.nodeid:
            counts[report.nodeid.split("[", 1)[1].split("-", 1)[0]] += 1
    if counts:
        terminalreporter.write_line("hostile sweep, probes passed per outcome: " + ", ".join(
            f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) + f"; total {sum(counts.values())}")
