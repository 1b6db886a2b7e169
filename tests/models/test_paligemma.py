"""PaliGemma behaviour: prefix-LM mask, cache, image encoded once, freezing, clear errors."""

import pytest
import torch

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.encoders.vit import VisionConfig
from polymodal.models.paligemma import PaliGemma, PaliGemmaConfig

IMG = 63


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = PaliGemmaConfig(
        vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2, hidden_dim=64),
        text=DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=8, hidden_dim=64,
                           mlp="geglu", norm="rmsnorm_gemma", tie_embeddings=True, embed_scale=True, max_seq_len=64),
        image_token_id=IMG)
    return PaliGemma(cfg).eval()


def inputs(prefix=3, suffix=3, rows=2):
    ids = torch.cat([torch.full((rows, 4), IMG), torch.randint(1, 60, (rows, prefix + suffix))], dim=1)
    tt = torch.cat([torch.zeros(rows, 4 + prefix), torch.ones(rows, suffix)], dim=1).long()
    return ids, tt, torch.randn(rows, 3, 16, 16)


def test_prefix_is_bidirectional_and_never_sees_the_suffix(model):
    ids, tt, px = inputs()
    with torch.no_grad():
        base = model(ids, px, token_type_ids=tt).logits
        changed_suffix = ids.clone()
        changed_suffix[:, -1] = (ids[:, -1] + 1) % 60 + 1
        after = model(changed_suffix, px, token_type_ids=tt).logits
        assert torch.allclose(after[:, :-1], base[:, :-1], atol=1e-6)  # nothing before the change moves
        changed_prefix = ids.clone()
        changed_prefix[:, 6] = (ids[:, 6] + 1) % 60 + 1  # last prefix token
        after = model(changed_prefix, px, token_type_ids=tt).logits
        assert not torch.allclose(after[:, 4], base[:, 4], atol=1e-4)  # an earlier prefix token sees it


def test_cached_decode_equals_full_forward(model):
    ids, tt, px = inputs(suffix=5)
    with torch.no_grad():
        full = model(ids, px, token_type_ids=tt).logits
        cache = model.make_cache(2, ids.shape[1])
        steps = [model(ids[:, :8], px, token_type_ids=tt[:, :8], cache=cache).logits]
        for t in range(8, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_images_are_encoded_once_per_generate_call(model):
    calls = []
    hook = model.vision.register_forward_hook(lambda *a: calls.append(1))
    try:
        ids, tt, px = inputs(suffix=0)
        pm.generate(model, ids, pixel_values=px, token_type_ids=tt, max_new_tokens=6)
    finally:
        hook.remove()
    assert len(calls) == 1


def test_trainable_parts_get_gradients_and_frozen_ones_do_not():
    torch.manual_seed(0)
    m = pm.build("paligemma-tiny")
    m.trainable(["projector"])
    n = m.config.tokens_per_image
    ids = torch.cat([torch.full((1, n), m.config.image_token_id), torch.randint(3, 100, (1, 6))], 1)
    px = torch.randn(1, 3, m.config.vision.image_size, m.config.vision.image_size)
    m(ids, px, labels=ids.masked_fill(ids == m.config.image_token_id, -100)).loss.backward()
    assert all(p.grad is not None for p in m.projector.parameters())
    assert all(p.grad is None for p in [*m.vision.parameters(), *m.decoder.parameters()])
    with pytest.raises(ValueError, match=r"unknown parts \['lm'\]"):
        m.trainable(["lm"])


def test_clear_errors(model):
    ids, tt, px = inputs()
    with pytest.raises(ValueError, match=r"pixel_values must be \(num_images, 3, 16, 16\), got \(2, 3, 32, 32\)"):
        model(ids, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="hold 8 image placeholder tokens .2 images of 4 tokens. but pixel_values "
                                         "holds 3 images"):
        model(ids, torch.randn(3, 3, 16, 16))
    with pytest.raises(ValueError, match="hold 8 image placeholder tokens but no pixel_values"):
        model(ids)
    mixed = ids.clone()
    mixed[1, :4] = 5  # row 1 has no image, but two images are given
    with pytest.raises(ValueError, match="hold 4 image placeholder tokens .1 images of 4 tokens. but pixel_values holds 2"):
        model(mixed, px)
    partial = ids.clone()
    partial[0, 0] = 5
    with pytest.raises(ValueError, match=r"each image needs exactly 4 placeholder tokens; rows \[0\] hold \[3\]"):
        model(partial, px)
