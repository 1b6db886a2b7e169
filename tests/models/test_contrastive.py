"""Dual encoders (CLIP, SigLIP): losses, chunking, training, errors, save/load."""

import math

import pytest
import torch
import torch.nn.functional as F

import polymodal as pm
from polymodal.config import ConfigError
from polymodal.families.contrastive.config import ContrastiveConfig
from polymodal.families.contrastive.model import sigmoid_loss, softmax_loss


def tiny(preset: str):
    model = pm.build(preset)
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, cfg.text.vocab_size, (6, 10), generator=g)
    ids[:, -1] = 2  # <eos>, which the CLIP preset pools
    px = torch.randn(6, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return model, ids, px


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()


def reference_sigmoid_loss(images, texts, logit_scale, logit_bias):
    """HF SiglipModel's loss, written out: -log sigmoid(z * logits) summed over texts, mean over images."""
    logits = images @ texts.T * logit_scale.exp() + logit_bias
    z = 2 * torch.eye(len(images), dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum(-1).mean()


@pytest.mark.parametrize("chunks", [1, 2, 3, 5, 9, 40])
def test_chunked_sigmoid_loss_equals_full_loss_and_gradients(chunks):
    images, texts = unit(9, 16, 0), unit(9, 16, 1)
    scale = torch.tensor([2.3], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-4.0], dtype=torch.float64, requires_grad=True)
    inputs = (images, texts, scale, bias)
    ref = reference_sigmoid_loss(*inputs)
    ref_grads = torch.autograd.grad(ref, inputs)
    loss = sigmoid_loss(*inputs, chunks=chunks)
    grads = torch.autograd.grad(loss, inputs)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_sigmoid_loss_backward_passes_gradcheck():
    images, texts = unit(5, 4, 2), unit(5, 4, 3)
    scale = torch.tensor([1.1], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: sigmoid_loss(*a, chunks=2), (images, texts, scale, bias))


def test_model_loss_in_chunks_equals_whole_loss():
    model, ids, px = tiny("siglip-tiny")
    whole = model(ids, px).loss
    whole.backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    chunked = model(ids, px, chunks=4).loss
    chunked.backward()
    assert abs(chunked.item() - whole.item()) <= 1e-6
    for k, p in model.named_parameters():  # fp32 sums in another order: within 1e-6 of each gradient's own scale
        assert (p.grad - ref[k]).abs().max() <= 1e-6 * max(1.0, ref[k].abs().max().item()), k


def test_all_ranks_without_a_process_group_is_the_local_loss():
    images, texts = unit(4, 8, 4), unit(4, 8, 5)
    scale, bias = torch.tensor([1.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    assert sigmoid_loss(images, texts, scale, bias, all_ranks=True) == sigmoid_loss(images, texts, scale, bias)
    assert softmax_loss(images, texts, scale, all_ranks=True) == softmax_loss(images, texts, scale)


def test_clip_temperature_is_capped_at_100():
    model, ids, px = tiny("clip-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
        out = model(ids, px)
    torch.testing.assert_close(out.logits_per_text, 100 * out.text_embeds @ out.image_embeds.T)


@pytest.mark.parametrize("preset", ["clip-tiny", "siglip-tiny"])
def test_overfits_one_batch(preset):
    model, ids, px = tiny(preset)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = model(ids, px).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.25 * losses[0]
    out = model(ids, px, return_loss=False)
    assert torch.equal(out.logits_per_image.argmax(1), torch.arange(6))  # each image finds its caption


def test_zero_shot_pairs_any_counts_without_a_loss():
    model, ids, px = tiny("siglip-tiny")
    out = model(ids[:4], px[:2], return_loss=False)
    assert out.logits_per_image.shape == (2, 4) and out.logits_per_text.shape == (4, 2) and out.loss is None
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))


def test_frozen_parts_get_no_gradients():
    model, ids, px = tiny("clip-tiny")
    model.trainable(["text", "head"])  # LiT: a locked image tower
    model(ids, px).loss.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is not None for p in model.text.parameters())
    assert model.logit_scale.grad is not None and model.visual_projection.weight.grad is not None
    with pytest.raises(ValueError, match=r"unknown parts \['decoder'\]"):
        model.trainable(["decoder"])


def test_state_dict_keys_and_save_load(tmp_path):
    model, ids, px = tiny("siglip-tiny")
    keys = set(model.state_dict())
    assert {"logit_scale", "logit_bias", "text.head.weight", "vision.head.probe",
            "text.layers.1.attn.wqkv.weight"} <= keys
    assert not any("projection" in k for k in keys)
    pm.save_pretrained(model, tmp_path / "m")
    back = pm.from_pretrained(tmp_path / "m")
    assert back.config == model.config
    model.eval()
    assert torch.equal(back(ids, px).loss, model(ids, px).loss)


def test_mismatched_batch_sizes_are_a_clear_error():
    model, ids, px = tiny("siglip-tiny")
    with pytest.raises(ValueError, match="pairs image i with text i, so it needs as many images as texts; "
                                         "got 5 images and 6 texts"):
        model(ids, px[:5])
    with pytest.raises(ValueError, match="got 3 images and 2 texts"):
        sigmoid_loss(unit(3, 4, 0), unit(2, 4, 1), torch.zeros(1), torch.zeros(1))


def test_wrong_image_size_is_a_clear_error():
    model, ids, px = tiny("clip-tiny")
    with pytest.raises(ValueError, match=r"pixel_values must be \(num_images, 3, 32, 32\), got \(6, 3, 16, 16\)"):
        model(ids, px[:, :, :16, :16])


def test_other_bad_inputs_are_clear_errors():
    model, ids, px = tiny("clip-tiny")
    no_eos = ids.clone()
    no_eos[1, -1] = 7
    with pytest.raises(ValueError, match=r"first eos_token_id \(2\); rows \[1\] have none"):
        model(no_eos, px)
    with pytest.raises(ValueError, match="chunks applies to the sigmoid loss"):
        model(ids, px, chunks=2)
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        model(torch.full((6, 33), 2), px)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of the input \(batch, seq\) = "
                                         r"\(6, 10\), got \(6, 9\)"):
        model(ids, px, torch.ones(6, 9))
    with pytest.raises(ValueError, match="chunks must be a positive int, got 0"):
        sigmoid_loss(unit(2, 4, 0), unit(2, 4, 1), torch.zeros(1), torch.zeros(1), chunks=0)


def test_config_errors():
    cfg = pm.PRESETS["siglip-tiny"]()
    with pytest.raises(ConfigError, match="need one width, got vision.dim=64 and a text output of 32; "
                                          "set projection_dim"):
        ContrastiveConfig(vision=cfg.vision, text=cfg.text.replace(projection_size=32), loss="sigmoid")
    with pytest.raises(ConfigError, match="vision.pooling_head must be True"):
        ContrastiveConfig(vision=cfg.vision.replace(pooling_head=False), text=cfg.text, loss="sigmoid")
    with pytest.raises(ConfigError, match=r"loss must be one of \['softmax', 'sigmoid'\], got 'hinge'"):
        ContrastiveConfig(vision=cfg.vision, text=cfg.text, loss="hinge")
