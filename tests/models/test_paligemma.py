"""PaliGemma behaviour: prefix-LM mask truth table, cache, packing, image encoded once, freezing, errors."""

import pytest
import torch

import polymodal as pm
from polymodal.config import ConfigError, DecoderConfig
from polymodal.encoders.vit import VisionConfig
from polymodal.families.paligemma.config import PaliGemmaConfig
from polymodal.families.paligemma.model import PaliGemma
from polymodal.presets import get_preset

IMG = 63  # 16x16 images, patch 8 -> 4 placeholder tokens per image


def config(**kw):
    return PaliGemmaConfig(
        vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2, hidden_dim=64),
        text=DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=8, hidden_dim=64,
                           mlp="geglu", norm="rmsnorm_gemma", tie_embeddings=True, embed_scale=True, max_seq_len=64),
        image_token_id=IMG, **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PaliGemma(config()).eval()


def inputs(prefix=3, suffix=3, rows=2):
    """[4 image tokens, prefix text, suffix text] per row; token_type_ids 0 on image + prefix."""
    ids = torch.cat([torch.full((rows, 4), IMG), torch.randint(1, 60, (rows, prefix + suffix))], dim=1)
    tt = torch.cat([torch.zeros(rows, 4 + prefix), torch.ones(rows, suffix)], dim=1).long()
    return ids, tt, torch.randn(rows, 3, 16, 16)


def moved(model, ids, px, tt, change_token=None, change_image=False):
    """Which positions of row 0 change when one token (or row 0's image) changes: (S,) bool."""
    ids2, px2 = ids.clone(), px.clone()
    if change_token is not None:
        ids2[0, change_token] = ids[0, change_token] % 59 + 1
    if change_image:
        px2[0] += 1.0
    with torch.no_grad():
        a, b = model(ids, px, token_type_ids=tt).logits, model(ids2, px2, token_type_ids=tt).logits
    assert torch.equal(a[1], b[1])  # rows never see each other
    return ((a[0] - b[0]).abs().amax(-1) > 1e-5).tolist()


def test_prefix_lm_mask_truth_table(model):
    # positions 0-3 image, 4-6 prefix, 7-9 suffix
    ids, tt, px = inputs()
    pre, suf = [True] * 7, [True] * 3
    assert moved(model, ids, px, tt, change_image=True) == pre + suf  # everything sees the image
    assert moved(model, ids, px, tt, change_token=6) == pre + suf  # the image sees the last prefix token
    assert moved(model, ids, px, tt, change_token=4) == pre + suf  # the suffix sees the whole prefix
    assert moved(model, ids, px, tt, change_token=7) == [False] * 7 + suf  # the prefix never sees the suffix
    assert moved(model, ids, px, tt, change_token=8) == [False] * 8 + [True] * 2  # the suffix is causal


def test_without_token_type_ids_the_whole_input_is_the_prefix(model):
    ids, tt, px = inputs(suffix=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, px).logits, model(ids, px, token_type_ids=torch.zeros_like(ids)).logits)
    got = pm.generate(model, ids, pixel_values=px, max_new_tokens=5)
    assert got.tolist() == pm.generate(model, ids, pixel_values=px, token_type_ids=tt, max_new_tokens=5).tolist()


@pytest.mark.parametrize("padded", [False, True])
def test_cached_decode_equals_full_forward(model, padded):
    ids, tt, px = inputs(suffix=5)
    am = torch.ones_like(ids)
    if padded:  # row 1 loses its first prefix token and is left-padded
        ids[1, 1:5], ids[1, 0], am[1, 0] = ids[1, :4].clone(), 0, 0
    n_prompt = ids.shape[1] - 5
    with torch.no_grad():
        full = model(ids, px, attention_mask=am, token_type_ids=tt).logits
        cache = model.make_cache(2, ids.shape[1])
        steps = [model(ids[:, :n_prompt], px, attention_mask=am[:, :n_prompt], token_type_ids=tt[:, :n_prompt],
                       cache=cache).logits]
        for t in range(n_prompt, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], cache=cache).logits)
    valid = am.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[valid], full[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["flex", "eager"])
def test_every_attention_backend_gives_the_same_model(model, backend):
    """pm.build(..., backend=): FlexAttention block masks (or the eager reference) under the image + prefix
    block, left padding and cached greedy decoding give the sdpa model's logits and tokens."""
    other = pm.build(config(), backend=backend).eval()
    other.load_state_dict(model.state_dict())
    ids, tt, px = inputs(suffix=4)
    am = torch.ones_like(ids)
    am[1, :2] = 0
    with torch.no_grad():
        want, got = (m(ids, px, attention_mask=am, token_type_ids=tt).logits for m in (model, other))
    torch.testing.assert_close(got[am.bool()], want[am.bool()], atol=1e-5, rtol=1e-5)
    prompt, ptt = ids[:, :9], tt[:, :9]
    assert torch.equal(pm.generate(other, prompt, am[:, :9], pixel_values=px, token_type_ids=ptt, max_new_tokens=6),
                       pm.generate(model, prompt, am[:, :9], pixel_values=px, token_type_ids=ptt, max_new_tokens=6))


def test_build_refuses_a_backend_for_a_model_without_a_decoder():
    with pytest.raises(ValueError, match="DualEncoder has no decoder .* backend must be 'sdpa', got 'flex'"):
        pm.build("siglip-tiny", backend="flex")


def test_packed_documents_match_each_alone(model):
    ids, tt, px = inputs(prefix=2, suffix=2)
    row = ids.reshape(1, -1)  # both documents in one row
    docs = torch.tensor([[1] * ids.shape[1] + [2] * ids.shape[1]])
    with torch.no_grad():
        packed = model(row, px, token_type_ids=tt.reshape(1, -1), document_ids=docs).logits
        alone = model(ids, px, token_type_ids=tt).logits
    torch.testing.assert_close(packed.reshape(alone.shape), alone, atol=1e-5, rtol=1e-5)


def test_images_are_encoded_once_per_generate_call(model):
    calls = []
    hook = model.vision.register_forward_hook(lambda *a: calls.append(1))
    try:
        ids, tt, px = inputs(suffix=0)
        out = pm.generate(model, ids, pixel_values=px, token_type_ids=tt, max_new_tokens=6)
    finally:
        hook.remove()
    assert out.shape == (2, 6) and len(calls) == 1


def test_training_learns_and_frozen_parts_get_no_gradients():
    torch.manual_seed(0)
    m = pm.build("paligemma-tiny")
    n, img = m.config.tokens_per_image, m.config.image_token_id
    ids = torch.cat([torch.full((2, n), img), torch.randint(3, 100, (2, 8))], 1)
    tt = torch.cat([torch.zeros(2, n + 4), torch.ones(2, 4)], 1).long()
    labels = ids.masked_fill(tt == 0, -100)  # loss on the suffix only
    px = torch.randn(2, 3, 32, 32)
    m.trainable(["vision", "projector"])
    m(ids, px, token_type_ids=tt, labels=labels).loss.backward()
    assert all(p.grad is not None for p in [*m.vision.parameters(), *m.projector.parameters()])
    assert all(p.grad is None for p in m.decoder.parameters())
    m.trainable(["vision", "projector", "decoder"])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = m(ids, px, token_type_ids=tt, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match=r"unknown parts \['lm'\]"):
        m.trainable(["lm"])


def test_clear_errors(model):
    ids, tt, px = inputs()
    with pytest.raises(ValueError, match=r"pixel_values must be \(num_images, 3, 16, 16\), got \(2, 3, 32, 32\)"):
        model(ids, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"hold 8 image placeholder tokens \(2 images of 4 tokens; per row \[1, 1\]\) "
                                         "but pixel_values holds 3 images"):
        model(ids, torch.randn(3, 3, 16, 16))
    with pytest.raises(ValueError, match="hold 8 image placeholder tokens but no pixel_values"):
        model(ids)
    mixed = ids.clone()
    mixed[1, :4] = 5  # row 1 has no image, but two images are given
    with pytest.raises(ValueError, match=r"hold 4 image placeholder tokens \(1 images of 4 tokens; per row \[1, 0\]\) "
                                         "but pixel_values holds 2"):
        model(mixed, px)
    partial = ids.clone()
    partial[0, 0] = 5
    with pytest.raises(ValueError, match=r"each image needs exactly 4 placeholder tokens; rows \[0\] hold \[3\]"):
        model(partial, px)
    with pytest.raises(ValueError, match="labels need token_type_ids"):
        model(ids, px, labels=ids)
    with pytest.raises(ValueError, match=r"token_type_ids must have the shape of input_ids \(2, 10\), got \(2, 9\)"):
        model(ids, px, token_type_ids=tt[:, 1:])
    cache = model.make_cache(2, 12)
    model(ids, px, token_type_ids=tt, cache=cache)
    with pytest.raises(ValueError, match=r"\['pixel_values'\] belong to the first \(prefill\) call"):
        model(ids[:, :1], px, cache=cache)


def test_configs():
    with pytest.raises(ConfigError, match=r"image_token_id \(64\) must be a token id below text.vocab_size \(64\)"):
        config().replace(image_token_id=64)
    with pytest.raises(ConfigError, match="SigLIP ViT, got variant 'clip'"):
        config().replace(vision=VisionConfig(variant="clip"))
    tiny = get_preset("paligemma-tiny")
    assert PaliGemmaConfig.from_dict(tiny.to_dict()) == tiny
    assert (tiny.vision.image_size, tiny.tokens_per_image, tiny.image_token_id) == (32, 16, tiny.text.vocab_size - 1)
    big = get_preset("paligemma-3b")
    assert (big.tokens_per_image, big.text.vocab_size, big.image_token_id) == (256, 257216, 257152)
    assert (big.vision.dim, big.vision.n_layers, big.text.dim, big.text.n_layers) == (1152, 27, 2048, 18)
