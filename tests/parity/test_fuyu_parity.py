"""Fuyu: a tiny random HF FuyuForCausalLM dir -> pm.from_pretrained -> the same logits and greedy tokens.

Patches go straight into a Persimmon decoder (partial rotary, squared ReLU, qk LayerNorm, biases,
per-head fused QKV); our Gemini model takes either raw images (patchified as Fuyu's processor does)
or HF's pre-patchified `pixel_values`.
"""

import pytest
import torch

import polymodal as pm
from polymodal.convert.hf import save_hf

from randomise import randomise  # tests/parity/randomise.py

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")

IMAGE_TOKEN, VOCAB, PATCH, SIZE = 5, 128, 4, 16  # 16x16 images: 16 patches of 4x4x3
TEXT = dict(model_type="persimmon", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def hf_fuyu(**text_overrides):
    torch.manual_seed(0)
    cfg = transformers.FuyuConfig(text_config={**TEXT, **text_overrides}, image_size=SIZE, patch_size=PATCH,
                                  image_token_id=IMAGE_TOKEN)
    model = transformers.FuyuForCausalLM(cfg)
    randomise(model, "norm", "bias")
    return model.eval()


@pytest.fixture(scope="module", params=["qk-layernorm", "no-qk-norm-full-rotary"])
def pair(request, tmp_path_factory):
    overrides = {} if request.param == "qk-layernorm" else dict(
        qk_layernorm=False, rope_parameters={"rope_type": "default", "rope_theta": 25000.0,
                                             "partial_rotary_factor": 1.0})
    hf = hf_fuyu(**overrides)
    path = tmp_path_factory.mktemp("fuyu")
    hf.save_pretrained(path)
    return hf, pm.from_pretrained(path)


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(6, VOCAB, (2, 26), generator=g)
    ids[:, 2:18] = IMAGE_TOKEN  # one image of 16 patches per row, then text
    return ids, torch.randn(2, 3, SIZE, SIZE, generator=g)


def test_logits_match_hf(pair):
    hf, ours = pair
    ids, images = inputs()
    patches = ours.patchify(images)  # (2, 16, 48), as FuyuImageProcessor lays them out
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=patches).logits
        from_images = ours(ids, pixel_values=images).logits
        from_patches = ours(ids, pixel_values=patches).logits
    assert (from_images - expected).abs().max() <= 1e-4
    assert (from_patches - expected).abs().max() <= 1e-4


def test_greedy_generation_matches_hf(pair):
    hf, ours = pair
    ids, images = inputs()
    expected = hf.generate(input_ids=ids, pixel_values=ours.patchify(images), max_new_tokens=10, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = pm.generate(ours, ids, pixel_values=images, max_new_tokens=10)
    assert got.tolist() == expected.tolist()


def test_export_round_trip(pair, tmp_path):
    hf, ours = pair
    save_hf(ours, tmp_path / "out", "fuyu")
    back = transformers.FuyuForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, images = inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=ours.patchify(images)).logits
        got = back(input_ids=ids, pixel_values=ours.patchify(images)).logits
    assert (got - expected).abs().max() <= 1e-5


def test_placeholder_count_mismatch_names_both_numbers(pair):
    _, ours = pair
    ids, images = inputs()
    ids[0, 17] = 9  # one placeholder fewer than the 2 x 16 patches
    with pytest.raises(ValueError, match="input_ids hold 31 image placeholder tokens but pixel_values gives 32"):
        ours(ids, pixel_values=images)
