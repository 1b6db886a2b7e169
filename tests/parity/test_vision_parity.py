"""SigLIP and CLIP vision towers: HF dir -> pm.from_pretrained -> same hidden states and pooled output."""

import pytest
import torch

import polymodal as pm
from polymodal.convert.hf import save_hf
from polymodal.encoders.vit import VisionConfig
from polymodal.serialization import save_state_dict

from randomise import randomise  # tests/parity/randomise.py

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16,
            patch_size=4)


@pytest.fixture(params=["siglip", "siglip-headless", "clip"])
def pair(request, tmp_path):
    torch.manual_seed(0)
    if request.param.startswith("siglip"):
        cfg = transformers.SiglipVisionConfig(**TINY, vision_use_head=request.param == "siglip")
        hf = transformers.SiglipVisionModel(cfg)
    else:
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY))
    randomise(hf, "norm", mean=1.0)
    randomise(hf, "bias")  # off HF's zero init, layer norms' too
    hf.save_pretrained(tmp_path / "hf")
    return hf.eval(), pm.from_pretrained(tmp_path / "hf"), request.param.split("-")[0]


def test_hidden_states_and_pooled_match(pair):
    hf, ours, _ = pair
    px = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = hf(pixel_values=px, output_hidden_states=True)
        out = ours(px, pooled=ref.pooler_output is not None)
        assert (out.features - ref.last_hidden_state).abs().max() <= 1e-4
        if ref.pooler_output is not None:
            assert (out.pooled - ref.pooler_output).abs().max() <= 1e-4
        for layer in (0, 1, -2, -1):  # VLMs pick a layer, e.g. CLIP's penultimate
            assert (ours(px, layer=layer).features - ref.hidden_states[layer]).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", ["siglip", "clip"])
def test_from_scratch_embeddings_start_as_the_reference(variant):
    """Not loaded weights: the spread our init gives the patch, position and class embeddings."""
    shape = dict(hidden_size=256, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=64,
                 patch_size=8)
    if variant == "siglip":
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**shape))
    else:
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**shape))
    ours = pm.build(VisionConfig(variant=variant, image_size=64, patch_size=8, dim=256, n_layers=1, n_heads=4,
                                 hidden_dim=64))
    ref = hf.embeddings
    pairs = {"pos_embed": (ours.pos_embed.weight, ref.position_embedding.weight),
             "patch_embed": (ours.patch_embed.weight, ref.patch_embedding.weight)}
    if variant == "clip":
        pairs["class_token"] = (ours.class_token, ref.class_embedding)
    for name, (mine, theirs) in pairs.items():
        assert mine.std().item() == pytest.approx(theirs.std().item(), rel=0.15), name
        assert mine.mean().abs().item() < 0.2 * theirs.std().item(), name


def test_round_trip_to_hf_is_identical(pair, tmp_path):
    hf, ours, variant = pair
    save_hf(ours, tmp_path / "back", f"{variant}_vision_model")
    back = type(hf).from_pretrained(tmp_path / "back").eval()
    px = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(pixel_values=px).last_hidden_state, hf(pixel_values=px).last_hidden_state)
    assert back.state_dict().keys() == hf.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in hf.state_dict().items())


def test_wrong_image_size_is_a_clear_error(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match=r"pixel_values must be \(num_images, 3, 16, 16\), got \(1, 3, 32, 32\)"):
        ours(torch.randn(1, 3, 32, 32))


def test_transformers_4_key_layout_loads(pair, tmp_path):
    """transformers 4.x wrote `vision_model.` before every key."""
    hf, ours, _ = pair
    save_state_dict({f"vision_model.{k}": v for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    hf.config.to_json_file(tmp_path / "config.json")
    loaded = pm.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))
