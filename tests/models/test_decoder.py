"""The decoder LM trains: gradients reach every parameter, one batch can be overfit, ignored labels cost nothing;
the loss reads the logits as scaled (Cohere's logit_scale)."""

import pytest
import torch
import torch.nn.functional as F

import polymodal as pm
from polymodal.config import DecoderConfig


def tiny(**kw):
    return pm.build(DecoderConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                  max_seq_len=32, **kw))


def test_backward_reaches_every_parameter():
    model = tiny()
    ids = torch.randint(0, 40, (2, 8))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_overfits_one_batch():
    model = tiny()
    ids = torch.randint(0, 40, (4, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(ids, labels=ids).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.1


def test_loss_is_shifted_and_ignores_minus_100():
    model = tiny().eval()
    ids = torch.randint(0, 40, (1, 6))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[0, 2:5], ids[0, 3:6])
    torch.testing.assert_close(out.loss, expected)


def test_logit_scale_scales_the_logits_and_the_loss_reads_them():
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=64, dim=32, n_heads=4, hidden_dim=64, parallel_blocks=True,
                        norm="layernorm_nobias", rope_interleaved=True)
    plain, scaled = pm.build(cfg).eval(), pm.build(cfg.replace(logit_scale=0.25)).eval()
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        out, ref = scaled(ids, labels=ids), plain(ids)
    torch.testing.assert_close(out.logits, 0.25 * ref.logits)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)


def test_parallel_blocks_need_pre_norm():
    with pytest.raises(ValueError, match="parallel_blocks needs norm_placement='pre', got 'post'"):
        DecoderConfig(parallel_blocks=True, norm_placement="post")
