"""Loading costs about the checkpoint's bytes: a ~140M-parameter bfloat16 checkpoint in HF's layout (separate
q/k/v and gate/up, fused by the load) is loaded in a fresh process, whose peak RSS growth during the load is
held to 1.2x the bytes the model holds; on the meta device the load holds (almost) nothing. About 10 s."""

import json
import subprocess
import sys

import pytest
import torch

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.convert.rules import export_state
from polymodal.families.decoder.convert import LLAMA
from polymodal.weights import write_weights

CONFIG = DecoderConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, hidden_dim=3072,
                       max_seq_len=2048, tie_embeddings=True)

MEASURE = """
import json, sys, torch
import polymodal as pm
from polymodal.config import DecoderConfig
def status(field):
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024
small = sys.argv[1] + "-small"  # a first load of a tiny model, so that what a load imports is not counted
pm.save_pretrained(pm.build(DecoderConfig(vocab_size=8, dim=8, n_layers=1, n_heads=1, hidden_dim=8)), small)
pm.from_pretrained(small, device=sys.argv[3])
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here: not the parent's at fork
before = status("VmRSS")
model = pm.from_pretrained(sys.argv[1], dtype=sys.argv[2] if sys.argv[2] == "auto" else getattr(torch, sys.argv[2]),
                           device=sys.argv[3])
print(json.dumps({"growth": status("VmHWM") - before, "params": sum(p.numel() for p in model.parameters())}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random bfloat16 weights written straight from a meta model's shapes (no float32 model in this process)."""
    with torch.device("meta"):
        model = pm.build(CONFIG)
    shapes = {k: v.shape for k, v in export_state(LLAMA.rules(CONFIG), model.state_dict()).items()}
    directory = tmp_path_factory.mktemp("llama140m")
    (directory / "config.json").write_text(json.dumps(LLAMA.config_to_hf(CONFIG)))
    tensors = {k: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02) for k, s in shapes.items()}
    write_weights(directory, tensors, max_shard_size="100MB")  # sharded, as large HF checkpoints are
    return directory, sum(t.numel() for t in tensors.values())


def growth(directory, dtype: str, device: str = "cpu") -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(directory), dtype, device], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype, bytes_per_param", [("auto", 2), ("float32", 4)])
def test_peak_memory_of_a_load_is_the_weights_bytes(checkpoint, dtype, bytes_per_param):
    directory, n = checkpoint
    assert n > 100e6
    measured = growth(directory, dtype)
    assert measured["params"] == n
    assert measured["growth"] <= 1.2 * n * bytes_per_param, (measured["growth"] / (n * bytes_per_param))


def test_a_load_onto_another_device_makes_no_float32_copy_on_the_cpu(checkpoint):
    directory, n = checkpoint
    measured = growth(directory, "float32", "meta")["growth"]
    # a float32 CPU copy would be 2x the file; what is left is its largest tensor, mapped while it is checked
    assert measured <= 0.3 * n * 2, measured / (n * 2)
