"""Loading at the cost of the weights (meta init, memory-mapped per-tensor reads) and saving in HF's sharded
layout: same logits as the model saved, transformers reads what polymodal writes, the dtype/device asked
for, quantization on the way in, and a clear error for every kind of damaged weight file."""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.convert.hf import save_hf
from polymodal.errors import CheckpointError, InputError
from polymodal.weights import INDEX, WEIGHTS, write_file

transformers = pytest.importorskip("transformers", reason="transformers reads the sharded HF export")


def tiny(**kw):
    return pm.build(DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                  max_seq_len=32, **kw)).eval()


IDS = torch.randint(0, 64, (2, 9))


def test_sharded_save_writes_hf_index_and_loads_back_identically(tmp_path):
    model = tiny()
    pm.save_pretrained(model, tmp_path / "m", max_shard_size=40_000)
    files = sorted(os.listdir(tmp_path / "m"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and WEIGHTS not in files and INDEX in files
    index = json.loads((tmp_path / "m" / INDEX).read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert all(os.path.getsize(tmp_path / "m" / f) <= 40_000 + 4096 for f in shards)  # + the header
    assert torch.equal(pm.from_pretrained(tmp_path / "m")(IDS).logits, model(IDS).logits)


def test_sharded_hf_export_loads_in_transformers_with_the_same_logits(tmp_path):
    model = tiny(tie_embeddings=False)
    save_hf(model, tmp_path / "hf", "llama", max_shard_size="20KB")
    assert (tmp_path / "hf" / INDEX).is_file()
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0)
    assert torch.equal(pm.from_pretrained(tmp_path / "hf")(IDS).logits, model(IDS).logits)


def test_dtype_auto_keeps_the_checkpoint_dtype_and_none_widens_exactly(tmp_path):
    model = tiny().to(torch.bfloat16)
    pm.save_pretrained(model, tmp_path / "m")
    auto = pm.from_pretrained(tmp_path / "m", dtype="auto")
    wide = pm.from_pretrained(tmp_path / "m")
    half = pm.from_pretrained(tmp_path / "m", dtype=torch.float16)
    for loaded, dtype in ((auto, torch.bfloat16), (wide, torch.float32), (half, torch.float16)):
        assert {p.dtype for p in loaded.parameters()} == {dtype}
        assert loaded.rotary.inv_freq.dtype == torch.float32  # computed again, not rounded to the weights' dtype
        torch.testing.assert_close(loaded.rotary.inv_freq, tiny().rotary.inv_freq, atol=0, rtol=0)
    assert torch.equal(wide.layers[0].attn.wqkv.weight, model.layers[0].attn.wqkv.weight.float())
    with pytest.raises(InputError, match="dtype must be a floating torch.dtype, 'auto' or None, got torch.int8"):
        pm.from_pretrained(tmp_path / "m", dtype=torch.int8)


def test_device_meta_reads_no_weights_into_memory(tmp_path):
    save_hf(tiny(), tmp_path / "hf", "llama")
    model = pm.from_pretrained(tmp_path / "hf", device="meta", dtype=torch.bfloat16)
    assert {(t.device.type, t.dtype) for t in model.parameters()} == {("meta", torch.bfloat16)}
    assert model.rotary.inv_freq.device.type == "meta"


def test_quantize_on_the_way_in_equals_quantizing_after(tmp_path):
    pm.save_pretrained(tiny(), tmp_path / "m")
    for mode in ("int8", "int4"):
        early = pm.from_pretrained(tmp_path / "m", quantize=mode)
        late = pm.quantize(pm.from_pretrained(tmp_path / "m"), mode)
        assert type(early.layers[0].mlp.w_in).__name__ == f"Int{mode[3]}Linear"
        assert torch.equal(early(IDS).logits, late(IDS).logits)


def _damaged(tmp_path, name: str, value: torch.Tensor):
    """A saved tiny model whose tensor `name` is replaced by `value`."""
    model = tiny()
    pm.save_pretrained(model, tmp_path / "m")
    state = dict(model.state_dict())
    state[name] = value
    write_file(tmp_path / "m" / WEIGHTS, state)
    return tmp_path / "m"


@pytest.mark.parametrize("bad, message", [
    (float("nan"), r"tensor layers.1.mlp.w_out.weight holds 1 non-finite values \(NaN or inf\) among 2,048"),
    (float("inf"), r"tensor layers.1.mlp.w_out.weight holds 1 non-finite values"),
    ((float("inf"), float("-inf")), r"tensor layers.1.mlp.w_out.weight holds 2 non-finite values"),
    ("int8", r"tensor layers.1.mlp.w_out.weight is torch.int8, where float weights belong"),
    ("bool", r"tensor layers.1.mlp.w_out.weight is torch.bool, where float weights belong"),
])
def test_non_finite_or_integer_weights_are_refused_naming_tensor_and_file(tmp_path, bad, message):
    weight = torch.randn(32, 64)
    if isinstance(bad, tuple):
        weight[3, 5], weight[4, 5] = bad
    elif isinstance(bad, float):
        weight[3, 5] = bad
    else:
        weight = weight.to(getattr(torch, bad))
    directory = _damaged(tmp_path, "layers.1.mlp.w_out.weight", weight)
    with pytest.raises(CheckpointError, match=f"{directory / WEIGHTS}: {message}"):
        pm.from_pretrained(directory)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_a_nan_is_refused_in_every_stored_float_dtype(tmp_path, dtype):
    weight = torch.randn(32, 64)
    weight[3, 5] = float("nan")
    directory = _damaged(tmp_path, "layers.1.mlp.w_out.weight", weight.to(dtype))
    with pytest.raises(CheckpointError, match=r"tensor layers.1.mlp.w_out.weight holds 1 non-finite values"):
        pm.from_pretrained(directory, dtype="auto")


@pytest.mark.parametrize("big, dtype", [(3e38, torch.float32), (6e4, torch.float16)])
def test_finite_weights_whose_sum_overflows_load(tmp_path, big, dtype):
    weight = torch.full((32, 64), big, dtype=dtype)  # each finite, their sum in that dtype not
    directory = _damaged(tmp_path, "layers.1.mlp.w_out.weight", weight)
    assert torch.equal(pm.from_pretrained(directory, dtype="auto").layers[1].mlp.w_out.weight, weight)


def _mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file this process has mapped (Linux)."""
    spans = []
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end, fields[5].strip()))
    return spans


def _in_file(tensor: torch.Tensor, path) -> bool:
    return any(start <= tensor.data_ptr() < end and name == str(path) for start, end, name in _mapped_files())


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings (Linux)")
def test_fused_parts_back_to_back_in_the_file_load_as_a_view_of_it(tmp_path):
    """safetensors sorts a file's tensors by name, so a layer's gate_proj and up_proj lie back to back: the
    fused w_in is then the file's own bytes, as an unfused tensor is; q/k/v (o_proj between) are copied."""
    model = tiny().to(torch.bfloat16)
    save_hf(model, tmp_path / "hf", "llama")
    loaded = pm.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    path = (tmp_path / "hf" / WEIGHTS).resolve()
    for ours, theirs in zip(loaded.layers, model.layers):
        assert torch.equal(ours.mlp.w_in.weight, theirs.mlp.w_in.weight) and _in_file(ours.mlp.w_in.weight, path)
        assert torch.equal(ours.attn.wqkv.weight, theirs.attn.wqkv.weight) and not _in_file(ours.attn.wqkv.weight, path)
        assert _in_file(ours.mlp.w_out.weight, path)
    assert not _in_file(pm.from_pretrained(tmp_path / "hf").layers[0].mlp.w_in.weight, path)  # cast: a copy
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_a_loaded_model_keeps_its_weights_when_its_files_are_saved_over_or_it_is_trained(tmp_path):
    """The weights are views of the mapped files: a save over the folder swaps in new files (the mapped ones
    live on), and a write to a weight stays in this process (the mapping is copy-on-write)."""
    model = tiny().to(torch.bfloat16)
    save_hf(model, tmp_path / "hf", "llama")
    loaded = pm.from_pretrained(tmp_path / "hf", dtype="auto")
    expected = model(IDS).logits
    other = tiny().to(torch.bfloat16)
    save_hf(other, tmp_path / "hf", "llama")
    pm.save_pretrained(loaded, tmp_path / "ours")
    assert torch.equal(loaded(IDS).logits, expected)
    assert torch.equal(pm.from_pretrained(tmp_path / "hf", dtype="auto")(IDS).logits, other(IDS).logits)
    assert torch.equal(pm.from_pretrained(tmp_path / "ours", dtype="auto")(IDS).logits, expected)
    with torch.no_grad():
        for p in loaded.parameters():
            p.add_(1)
    again = pm.from_pretrained(tmp_path / "ours", dtype="auto")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_a_non_finite_value_in_a_fused_part_names_that_part(tmp_path):
    save_hf(tiny(), tmp_path / "hf", "llama")
    path = tmp_path / "hf" / WEIGHTS
    state = {k: v.clone() for k, v in load_file(path).items()}  # not views of the file written over next
    state["model.layers.1.mlp.up_proj.weight"][7, 3] = float("nan")
    write_file(path, state)
    with pytest.raises(CheckpointError, match=f"{path}: tensor model.layers.1.mlp.up_proj.weight holds 1 non-finite"):
        pm.from_pretrained(tmp_path / "hf", dtype="auto")


def test_a_load_and_a_plain_generate_import_neither_torch_dynamo_nor_sympy(tmp_path):
    """About a second of each: a meta model's random init and computed buffers run through torch._refs, which
    imports them, and so did marking a cache for torch.compile."""
    pm.save_pretrained(pm.build("paligemma-tiny"), tmp_path / "m")
    code = ("import sys, torch, polymodal as pm\n"
            f"model = pm.from_pretrained({str(tmp_path / 'm')!r}, dtype=torch.bfloat16)\n"
            "ids = torch.randint(3, 100, (1, 8))\n"
            "assert pm.generate(model, ids, torch.ones_like(ids), max_new_tokens=2).shape == (1, 2)\n"
            "print([m for m in ('torch._dynamo', 'sympy') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_overwritten_header_bytes_are_a_clear_error(tmp_path):
    pm.save_pretrained(tiny(), tmp_path / "m")
    path = tmp_path / "m" / WEIGHTS
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 + length // 2: 8 + length // 2 + 16] = b"\xff" * 16  # the middle of the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path} is not a readable safetensors file .*header may be overwritten"):
        pm.from_pretrained(tmp_path / "m")
    data[:8] = struct.pack("<Q", len(data) * 2)  # a header length past the end of the file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path} is not a readable safetensors file"):
        pm.from_pretrained(tmp_path / "m")


def test_a_bad_shard_size_is_refused_before_writing(tmp_path):
    for bad in (0, -5, "5 parsecs", "GB", True):
        with pytest.raises(InputError, match="max_shard_size must be a positive number of bytes"):
            pm.save_pretrained(tiny(), tmp_path / "m", max_shard_size=bad)
    assert not (tmp_path / "m").exists()
