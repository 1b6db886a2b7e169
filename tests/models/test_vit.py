"""The one ViT (CLIP and SigLIP): shapes, layer selection, full attention, clear errors, config rules."""

import pytest
import torch

import polymodal as pm
from polymodal.config import ConfigError
from polymodal.encoders.vit import ViT, VisionConfig


def tiny(variant, **kw):
    torch.manual_seed(0)
    cfg = VisionConfig(variant=variant, image_size=16, patch_size=4, dim=32, n_layers=3, n_heads=4, hidden_dim=64, **kw)
    return ViT(cfg).eval()


@pytest.mark.parametrize("variant, tokens", [("siglip", 16), ("clip", 17)])
def test_shapes(variant, tokens):
    vit = tiny(variant)
    out = vit(torch.randn(2, 3, 16, 16), pooled=True)
    assert out.features.shape == (2, tokens, 32) and out.pooled.shape == (2, 32)
    assert vit(torch.randn(2, 3, 16, 16)).pooled is None


@pytest.mark.parametrize("variant", ["siglip", "clip"])
def test_layer_selection(variant):
    vit, px = tiny(variant), torch.randn(2, 3, 16, 16)
    ran = []
    hooks = [b.register_forward_hook(lambda *a, i=i: ran.append(i)) for i, b in enumerate(vit.layers)]
    with torch.no_grad():
        torch.testing.assert_close(vit(px, layer=0).features, vit.embed(px))
        assert ran == []  # nothing past the chosen layer is computed
        penultimate = vit(px, layer=-2).features
        assert ran == [0, 1]
        torch.testing.assert_close(vit.layers[2](penultimate), vit(px, layer=-1).features)
        torch.testing.assert_close(vit(px, layer=3).features, vit(px, layer=-1).features)
        last = vit(px).features
    for h in hooks:
        h.remove()
    if variant == "siglip":  # SigLIP's features are post-normed (what PaliGemma reads), CLIP's are not
        torch.testing.assert_close(last, vit.post_norm(vit(px, layer=-1).features))
    else:
        torch.testing.assert_close(last, vit(px, layer=-1).features)
    with pytest.raises(ValueError, match=r"layer must be in \[-4, 3\] for a ViT of 3 blocks .* got 4"):
        vit(px, layer=4)


@pytest.mark.parametrize("variant", ["siglip", "clip"])
def test_every_patch_sees_every_patch_and_images_stay_apart(variant):
    vit, px = tiny(variant), torch.randn(2, 3, 16, 16)
    changed = px.clone()
    changed[0, :, -4:, -4:] += 1.0  # only the last patch of image 0
    with torch.no_grad():
        a, b = vit(px, pooled=True), vit(changed, pooled=True)
    assert (a.features[0, 0] - b.features[0, 0]).abs().max() > 1e-4  # the first token sees the last patch
    assert torch.equal(a.features[1], b.features[1]) and torch.equal(a.pooled[1], b.pooled[1])
    with torch.no_grad():
        alone = vit(px[1:], pooled=True)
    torch.testing.assert_close(alone.features[0], a.features[1], atol=1e-5, rtol=1e-5)


def test_backward_reaches_every_parameter():
    vit = tiny("siglip").train()
    vit(torch.randn(2, 3, 16, 16), pooled=True).pooled.square().sum().backward()
    assert [n for n, p in vit.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []


def test_clear_errors():
    vit = tiny("siglip")
    for bad in [torch.randn(1, 3, 32, 32), torch.randn(1, 1, 16, 16), torch.randn(3, 16, 16)]:
        with pytest.raises(ValueError, match=rf"pixel_values must be \(num_images, 3, 16, 16\), got "
                                             rf"\({', '.join(map(str, bad.shape))}\)"):
            vit(bad)
    with pytest.raises(ValueError, match="no pooling head"):
        tiny("siglip", pooling_head=False)(torch.randn(1, 3, 16, 16), pooled=True)


def test_config_defaults_follow_the_variant_and_round_trip():
    clip, siglip = VisionConfig(variant="clip"), VisionConfig()
    assert (clip.mlp, clip.norm_eps, clip.pooling_head) == ("quick_gelu", 1e-5, False)
    assert (siglip.mlp, siglip.norm_eps, siglip.pooling_head) == ("gelu_tanh", 1e-6, True)
    assert VisionConfig.from_dict(clip.to_dict()) == clip
    with pytest.raises(ConfigError, match="unknown option.*'patch'.*valid options"):
        VisionConfig.from_dict({"patch": 14})
    with pytest.raises(ConfigError, match=r"image_size \(30\) must be divisible by patch_size \(4\)"):
        VisionConfig(image_size=30, patch_size=4)
    with pytest.raises(ConfigError, match="CLIP has no attention-pooling head"):
        VisionConfig(variant="clip", pooling_head=True)
    with pytest.raises(ConfigError, match="variant must be one of"):
        VisionConfig(variant="vit")


def test_built_and_saved_through_the_public_api(tmp_path):
    vit = pm.build(VisionConfig(variant="clip", image_size=16, patch_size=8, dim=16, n_layers=1, n_heads=2,
                                hidden_dim=32)).eval()
    pm.save_pretrained(vit, tmp_path / "vit")
    back = pm.from_pretrained(tmp_path / "vit")
    px = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(px, pooled=True).pooled, vit(px, pooled=True).pooled)
