"""Weight-only int8 / int4 decoding: each layer computes x @ dequantized(W).T, rounding is within half a
step, a quantized checkpoint loads smaller, stays within the stated logit drift and generates consistently."""

import pytest
import torch
from torch import nn

import polymodal as pm
from polymodal.nn.quantize import Int4Linear, Int8Linear, model_bytes

# the stated bounds: max |logit drift| vs float32, as a fraction of the largest float32 logit, on random
# N(0, 0.05) weights (measured: int8 0.019-0.021, int4 0.20-0.25 over three seeds; the README has a trained model's)
DRIFT = {"int8": 0.04, "int4": 0.4}


def int8_reference(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(1, keepdim=True) / 127
    return (w / scale).round() * scale


def int4_reference(w: torch.Tensor, group: int) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    return (((g - lo) / step).round() * step + lo).reshape(w.shape)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_layer_multiplies_by_the_dequantized_weight(mode):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    x = torch.randn(3, 5, 96)
    w = linear.weight.detach()
    layer = Int8Linear(linear) if mode == "int8" else Int4Linear(linear, group_size=32)
    dequantized = int8_reference(w) if mode == "int8" else int4_reference(w, 32)
    half_step = (w.abs().amax(1, keepdim=True) / 127 if mode == "int8" else
                 (w.reshape(40, 3, 32).amax(-1) - w.reshape(40, 3, 32).amin(-1)).repeat_interleave(32, 1) / 15) / 2
    assert ((dequantized - w).abs() <= half_step + 1e-6).all()
    with torch.no_grad():
        assert (layer(x) - (x @ dequantized.T + linear.bias)).abs().max() <= 1e-4


def test_int4_pads_a_width_that_is_no_multiple_of_the_group():
    linear = nn.Linear(72, 16, bias=False)
    x = torch.randn(4, 72)
    padded = torch.nn.functional.pad(linear.weight.detach(), (0, 24))
    with torch.no_grad():
        assert (Int4Linear(linear, 32)(x) - x @ int4_reference(padded, 32)[:, :72].T).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = pm.build(pm.DecoderConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                                      hidden_dim=256, init_std=0.05))
    d = tmp_path_factory.mktemp("decoder")
    pm.save_pretrained(model, d)
    return d


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_is_smaller_stays_within_the_drift_and_generates(checkpoint, mode):
    full, quantized = pm.from_pretrained(checkpoint), pm.from_pretrained(checkpoint, quantize=mode)
    linears = sum(m.weight.numel() for m in full.layers.modules() if isinstance(m, nn.Linear))
    saved = model_bytes(full) - model_bytes(quantized)
    assert saved >= linears * 4 * (0.7 if mode == "int8" else 0.8)  # 4 bytes -> 1 (+ scales) or 1/2 (+ groups)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        want, got = full(ids).logits, quantized(ids).logits
    assert 0 < (got - want).abs().max() <= DRIFT[mode] * want.abs().max()
    dequantized = pm.from_pretrained(checkpoint)  # the drift is all rounding: fp32 with the rounded weights
    with torch.no_grad():
        for m in dequantized.layers.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(int8_reference(m.weight) if mode == "int8" else
                               int4_reference(nn.functional.pad(m.weight, (0, -m.in_features % 32)), 32)[:, :m.in_features])
        assert (dequantized(ids).logits - got).abs().max() <= 1e-4
    new = pm.generate(quantized, ids, max_new_tokens=6)
    with torch.no_grad():  # cached decoding with quantized weights == greedy on the full forward
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, quantized(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(new, seq[:, 24:])


def test_bad_quantize_input_is_a_clear_error(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="quantize must be 'int8' or 'int4' \\(or None\\), got 'int3'"):
        pm.from_pretrained(checkpoint, quantize="int3")
    with pytest.raises(ValueError, match="group_size must be one of \\(32, 64, 128, 256\\), got 48"):
        pm.quantize(pm.from_pretrained(checkpoint), "int4", group_size=48)
    model = pm.add_lora(pm.from_pretrained(checkpoint), rank=2)
    with pytest.raises(ValueError, match="merge them into the weights"):
        pm.quantize(model, "int8")
    pm.save_adapter(model, tmp_path / "adapter", base_model=checkpoint)  # an adapter dir merges, then quantizes
    assert isinstance(pm.from_pretrained(tmp_path / "adapter", quantize="int8").layers[0].attn.wqkv, Int8Linear)
    with pytest.raises(ValueError, match="a ViT has none"):
        pm.quantize(pm.build("siglip-tiny").vision, "int8")
