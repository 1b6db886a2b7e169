"""LoRA on every family: base keys unchanged, only adapters train, a fused layer's slices act as separate
layers would, merged == unmerged, adapters round-trip through files, and bad input is a clear error."""

import pytest
import torch

import polymodal as pm
from polymodal.nn.lora import LoRALinear, adapters

FAMILIES = ["llama-tiny", "paligemma-tiny", "gemini-tiny", "kosmos-tiny", "chameleon-tiny", "flamingo-tiny"]


def randomise_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)


def decoder_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    decoder = getattr(model, "decoder", model)
    with torch.no_grad():
        return decoder(ids).logits


@pytest.mark.parametrize("preset", FAMILIES)
def test_any_family_keeps_its_keys_trains_only_adapters_and_merges_exactly(preset):
    if preset not in pm.PRESETS:
        pytest.skip(f"no preset {preset}")
    model = pm.build(preset).eval()
    keys = set(model.state_dict())
    pm.add_lora(model, rank=2, alpha=4)
    assert keys < set(model.state_dict())  # the base keys, plus the adapters'
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefix = "decoder." if hasattr(model, "decoder") else ""
    assert trainable and all(".lora_" in n and n.startswith(prefix) for n in trainable)  # by default: the decoder
    gated = getattr(model, "decoder", model).config.mlp in ("swiglu", "geglu")
    mlp = {"gate_proj", "up_proj", "down_proj"} if gated else {"fc1", "fc2"}
    assert {n.rsplit(".", 1)[-1] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", *mlp}
    randomise_adapters(model)
    ids = torch.randint(0, 50, (2, 7))
    unmerged = decoder_logits(model, ids)
    pm.merge_lora(model)
    assert set(model.state_dict()) == keys and not adapters(model)
    assert (decoder_logits(model, ids) - unmerged).abs().max() <= 1e-4


def test_a_fused_slice_is_a_separate_projection():
    """LoRA on q and v of the fused QKV layer: q and v outputs move by scale * B A x, k does not."""
    model = pm.build("llama-tiny")
    wqkv = model.layers[0].attn.wqkv
    pm.add_lora(model, rank=3, alpha=6, targets=["q", "v"])
    lora = model.layers[0].attn.wqkv
    assert isinstance(lora, LoRALinear) and lora.weight is wqkv.weight and [s.name for s in lora.slices] == ["q_proj", "v_proj"]
    randomise_adapters(model)
    x = torch.randn(4, wqkv.in_features)
    with torch.no_grad():
        got, base = lora(x), wqkv(x)
        for s in lora.slices:
            want = base[:, s.start:s.stop] + 2.0 * x @ lora.lora_A[s.name].T @ lora.lora_B[s.name].T
            assert (got[:, s.start:s.stop] - want).abs().max() <= 1e-5
        k = next(s for s in [*lora.slices] if s.name == "q_proj").stop
        assert torch.equal(got[:, k:lora.slices[1].start], base[:, k:lora.slices[1].start])


def test_vision_tower_and_projector_on_request():
    model = pm.build("paligemma-tiny")
    pm.add_lora(model, targets=["q_proj", "fc1", "linear"], parts=["vision", "projector"])
    adapted = adapters(model)
    assert adapted and all(p.startswith(("vision.", "projector")) for p in adapted)
    assert "projector" in adapted and any(p.endswith("mlp.w_in") for p in adapted)


def test_round_trip_through_files_for_a_family_without_an_hf_key_map(tmp_path):
    model = pm.add_lora(pm.build("gemini-tiny").eval(), rank=2, targets=["v", "down_proj"])
    randomise_adapters(model)
    pm.save_adapter(model, tmp_path / "adapter")
    fresh = pm.build("gemini-tiny").eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    pm.load_adapter(fresh, tmp_path / "adapter")
    ids = torch.randint(0, 50, (1, 6))
    assert torch.equal(decoder_logits(fresh, ids), decoder_logits(model, ids))


def test_bad_input_is_a_clear_error(tmp_path):
    model = pm.build("llama-tiny")
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
        pm.add_lora(model, rank=0)
    with pytest.raises(ValueError, match=r"unknown LoRA target 'qkv'.*named \['down_proj', 'gate_proj'"):
        pm.add_lora(model, targets=["q", "qkv"])
    with pytest.raises(ValueError, match=r"unknown LoRA parts \['vision'\]"):
        pm.add_lora(model, parts=["vision"])
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        pm.merge_lora(model)
    pm.add_lora(model, rank=2)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        pm.add_lora(model, rank=2)
    pm.save_adapter(model, tmp_path / "llama")
    with pytest.raises(ValueError, match="is an adapter for another model"):  # other module names
        pm.load_adapter(pm.build("paligemma-tiny"), tmp_path / "llama")
    wider = pm.build(pm.PRESETS["llama-tiny"]().replace(dim=2 * model.config.dim))
    with pytest.raises(ValueError, match=r"lora_[AB] has shape \(\d+, \d+\), this model expects \(\d+, \d+\)"):
        pm.load_adapter(wider, tmp_path / "llama")  # same names, other shapes
    assert not adapters(wider)  # refused before the model changed
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter directory"):
        pm.load_adapter(pm.build("llama-tiny"), tmp_path)
