"""Numbers that enter through a LoRA adapter file: an A without its B, and a scale (rsLoRA's alpha / sqrt(r)
against alpha / r) that differs from the adapters a model already has. Each was loaded without a word and gave
other logits than the adapter's; now each is a one-line error before the model changes. A rank or alpha given as
a numpy number is kept as a plain one, so the adapter saves."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import polymodal as pm
from polymodal.convert.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from polymodal.nn.lora import adapters

IDS = torch.randint(0, 100, (2, 7))


def saved_adapter(tmp_path, rank=4, alpha=8):
    """A llama-tiny base and a random adapter of it, saved; the model holding that adapter."""
    pm.save_pretrained(pm.build("llama-tiny"), tmp_path / "base")
    model = pm.add_lora(pm.from_pretrained(tmp_path / "base"), rank=rank, alpha=alpha)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    pm.save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")
    return model


@pytest.mark.parametrize("drop", ["A", "B"])
def test_an_adapter_file_missing_half_of_a_pair_is_refused(tmp_path, drop):
    saved_adapter(tmp_path)
    path = tmp_path / "adapter" / ADAPTER_WEIGHTS
    tensors = load_file(path)
    dropped = next(k for k in sorted(tensors) if "layers.1.self_attn.v_proj" in k and f"lora_{drop}" in k)
    del tensors[dropped]
    save_file(tensors, path)
    kept = "A" if drop == "B" else "B"
    base = pm.from_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=rf"{ADAPTER_WEIGHTS} holds lora_{kept} of layers.1.attn.wqkv \(v_proj\), "
                                         "expected one lora_A and one lora_B: the adapter file is incomplete"):
        pm.load_adapter(base, tmp_path / "adapter")
    assert not adapters(base)  # refused before the model changed
    with pytest.raises(ValueError, match="the adapter file is incomplete"):
        pm.from_pretrained(tmp_path / "adapter")


def test_an_rslora_adapter_into_plain_adapters_of_the_same_rank_is_refused(tmp_path):
    saved_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    (tmp_path / "adapter" / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_rslora": True}))
    fresh = pm.from_pretrained(tmp_path / "adapter")  # rsLoRA's scale alpha / sqrt(r) = 4, not alpha / r = 2
    assert {layer.scale for layer in adapters(fresh).values()} == {4.0}
    plain = pm.add_lora(pm.from_pretrained(tmp_path / "base"), rank=4, alpha=8)
    with pytest.raises(ValueError, match=r"has r=4, lora_alpha=8, use_rslora=True \(scale 4\); the model's adapters "
                                         r"r=4, alpha=8, scale 2"):
        pm.load_adapter(plain, tmp_path / "adapter")
    # with rank 1 the two scales agree, and the adapter loads into plain adapters with its own logits
    saved = saved_adapter(tmp_path / "r1", rank=1, alpha=8)
    config = json.loads((tmp_path / "r1" / "adapter" / ADAPTER_CONFIG).read_text())
    (tmp_path / "r1" / "adapter" / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_rslora": True}))
    plain = pm.load_adapter(pm.add_lora(pm.from_pretrained(tmp_path / "r1" / "base"), rank=1, alpha=8),
                            tmp_path / "r1" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, saved(IDS).logits, atol=0, rtol=0)


def test_a_numpy_rank_and_alpha_save_and_load_back(tmp_path):
    model = saved_adapter(tmp_path / "plain")  # rank 4, alpha 8 as Python numbers
    numpy_made = pm.add_lora(pm.from_pretrained(tmp_path / "plain" / "base"), rank=np.int64(4), alpha=np.float32(8))
    numpy_made.load_state_dict(model.state_dict())
    pm.save_adapter(numpy_made, tmp_path / "numpy", base_model=tmp_path / "plain" / "base")
    config = json.loads((tmp_path / "numpy" / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    with torch.no_grad():
        torch.testing.assert_close(pm.from_pretrained(tmp_path / "numpy")(IDS).logits, model(IDS).logits, atol=0, rtol=0)
