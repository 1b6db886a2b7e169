"""Numbers that enter through weight files: a value the asked dtype cannot hold, a float8 or complex checkpoint, a
sharded index that does not match its shards, a quantized model saved as if it were a float one or quantized
again, a mask VQ-VAE file holding NaN. Each is a one-line error naming what is wrong, before the model computes
anything; and dtype="auto" reads an HF config's dtype as transformers does."""

import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import polymodal as pm
from polymodal.cli import main
from polymodal.config import DecoderConfig
from polymodal.convert.hf import save_hf
from polymodal.encoders.mask_vae import MaskVAE, MaskVAEConfig, load_mask_vae, mask_vae_npz
from polymodal.errors import CheckpointError, InputError
from polymodal.weights import INDEX


def tiny():
    return pm.build(DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                  max_seq_len=32, tie_embeddings=False)).eval()


@pytest.mark.parametrize("stored, big", [(torch.float32, 1e5), (torch.bfloat16, 1e6)])
def test_a_weight_past_float16s_range_is_refused_when_loaded_as_float16(tmp_path, stored, big):
    model = tiny().to(stored)
    with torch.no_grad():
        model.layers[1].mlp.w_out.weight[3, 5] = big
    stored_value = model.layers[1].mlp.w_out.weight[3, 5].item()  # bfloat16 rounds 1e6
    pm.save_pretrained(model, tmp_path / "m")
    save_hf(model, tmp_path / "hf", "llama")
    for directory, name in ((tmp_path / "m", "layers.1.mlp.w_out.weight"),
                            (tmp_path / "hf", "model.layers.1.mlp.down_proj.weight")):
        with pytest.raises(InputError, match=rf"tensor {name} holds 1 value past torch.float16's range \(65504\), "
                                             rf"up to {stored_value:g}: cast to torch.float16 they become inf; load it "
                                             r"as torch.bfloat16 or torch.float32 or torch.float64"):
            pm.from_pretrained(directory, dtype=torch.float16)
        wide = pm.from_pretrained(directory, dtype=torch.float32)  # a dtype that holds them loads them as stored
        assert wide.layers[1].mlp.w_out.weight[3, 5] == model.layers[1].mlp.w_out.weight[3, 5].float()


def test_a_float64_weight_past_float32s_range_names_the_one_dtype_that_holds_it(tmp_path):
    model = tiny().double()
    with torch.no_grad():
        model.layers[0].attn.wo.weight[0, 0] = 1e300
    pm.save_pretrained(model, tmp_path / "m")
    with pytest.raises(InputError, match=r"tensor layers.0.attn.wo.weight holds 1 value past torch.float32's range "
                                         r"\(3.40282e\+38\), up to 1e\+300: cast to torch.float32 they become inf; "
                                         r"load it as torch.float64$"):
        pm.from_pretrained(tmp_path / "m")
    assert pm.from_pretrained(tmp_path / "m", dtype="auto").layers[0].attn.wo.weight[0, 0] == 1e300


def test_a_float8_checkpoint_computes_in_bfloat16_and_float8_is_refused_as_a_compute_dtype(tmp_path):
    stored = tiny().to(torch.float8_e4m3fn)
    pm.save_pretrained(stored, tmp_path / "m")
    auto = pm.from_pretrained(tmp_path / "m", dtype="auto")
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}
    assert torch.equal(auto.layers[0].attn.wqkv.weight, stored.layers[0].attn.wqkv.weight.to(torch.bfloat16))
    assert torch.isfinite(auto(torch.randint(0, 64, (1, 5))).logits).all()
    with pytest.raises(InputError, match=r"dtype torch.float8_e4m3fn stores weights but does not compute here: load "
                                         r"with dtype=torch.bfloat16"):
        pm.from_pretrained(tmp_path / "m", dtype=torch.float8_e4m3fn)


def test_dtype_auto_follows_the_dtype_an_hf_config_names_as_transformers_does_and_convert_keeps_the_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny()
    save_hf(model, tmp_path / "hf", "llama")  # float32 weights
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    ours = pm.from_pretrained(tmp_path / "hf", dtype="auto")
    assert {p.dtype for p in ours.parameters()} == {p.dtype for p in theirs.parameters()} == {torch.bfloat16}
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours"), "--to", "polymodal"]) == 0
    converted = load_file(tmp_path / "ours" / "model.safetensors")  # convert keeps the files' values, unrounded
    assert torch.equal(converted["layers.0.mlp.w_out.weight"], model.layers[0].mlp.w_out.weight)


def test_a_complex_tensor_in_a_weights_place_is_named_complex(tmp_path):
    model = tiny()
    pm.save_pretrained(model, tmp_path / "m")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layers.0.attn.wo.weight"] = state["layers.0.attn.wo.weight"].to(torch.complex64)
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor layers.0.attn.wo.weight is torch.complex64, where float weights "
                                              r"belong; the file holds complex numbers in a weight's place"):
        pm.from_pretrained(tmp_path / "m")


def _sharded(tmp_path):
    """A tiny model saved in three shards, its index and the shard of its first listed tensor."""
    model = tiny()
    pm.save_pretrained(model, tmp_path / "m", max_shard_size=40_000)
    index = json.loads((tmp_path / "m" / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3
    return model, index, shards


def test_a_tensor_the_index_lists_but_its_shard_lacks_names_index_and_shard(tmp_path):
    _, index, shards = _sharded(tmp_path)
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    tensors = load_file(tmp_path / "m" / shards[0])
    del tensors[name]
    save_file(tensors, tmp_path / "m" / shards[0])
    with pytest.raises(CheckpointError, match=rf"{INDEX} lists tensor {name} in {shards[0]}, which does not hold it"):
        pm.from_pretrained(tmp_path / "m")


def test_a_tensor_stored_in_two_shards_is_refused_naming_both(tmp_path):
    _, index, shards = _sharded(tmp_path)
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    other = load_file(tmp_path / "m" / shards[1])
    other[name] = torch.full_like(load_file(tmp_path / "m" / shards[0])[name], 7.0)  # a second, different copy
    save_file(other, tmp_path / "m" / shards[1])
    with pytest.raises(CheckpointError, match=rf"tensor {name} is stored twice, in {shards[0]} and in {shards[1]}"):
        pm.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_model_is_not_saved_as_a_checkpoint_nor_exported(tmp_path, mode):
    model = pm.quantize(tiny(), mode)
    for save in (lambda d: pm.save_pretrained(model, d), lambda d: save_hf(model, d, "llama")):
        with pytest.raises(InputError, match=rf"layers.0.attn.wqkv is {mode}-quantized: save the float model and "
                                             rf"load it with quantize='{mode}'"):
            save(tmp_path / "q")
        assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("bad, dtype", [(float("nan"), np.float32), (1e300, np.float64)])
def test_a_mask_vae_file_holding_a_nan_or_a_value_past_float32_is_refused(tmp_path, bad, dtype):
    with np.load(io.BytesIO(mask_vae_npz(MaskVAE(MaskVAEConfig(hidden_dim=2, codebook_dim=4))))) as npz:
        arrays = {name: npz[name].astype(dtype) for name in npz.files}
    arrays["decoder.6.weight"].flat[3] = bad
    np.savez(tmp_path / "vae-oid.npz", **arrays)
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'vae-oid.npz'}: tensor decoder.6.weight holds 1 "
                                              r"non-finite values \(NaN or inf\)"):
        load_mask_vae(tmp_path / "vae-oid.npz")


@pytest.mark.parametrize("first, then", [("int8", "int4"), ("int4", "int8"), ("int8", "int8")])
def test_quantizing_a_quantized_decoder_again_is_refused(first, then):
    model = pm.quantize(tiny(), first)
    with pytest.raises(InputError, match=rf"the decoder is {first}-quantized already \(layers.0.attn.wqkv\): quantize "
                                         r"the float model"):
        pm.quantize(model, then)  # it returned the model as it was: int8 when int4 was asked
