"""Each position scheme against a direct formula."""

import math

import torch

from polymodal.nn.positions import ALiBi, Rotary, alibi_slopes


def test_rope_matches_complex_rotation():
    hs, theta = 8, 10000.0
    pos = torch.tensor([[0, 3, 7]])
    x = torch.randn(1, 1, 3, hs)
    q, _ = Rotary(hs, theta)(pos).rotate(x, x)
    # HF layout: pairs (x[i], x[i + hs/2]) rotate by pos * theta**(-2i/hs)
    z = torch.complex(x[..., : hs // 2], x[..., hs // 2:])
    freqs = theta ** (-torch.arange(0, hs, 2).float() / hs)
    rotated = z * torch.polar(torch.ones(3, hs // 2), pos[0, :, None].float() * freqs)
    torch.testing.assert_close(q, torch.cat((rotated.real, rotated.imag), -1), atol=1e-6, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rot = Rotary(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    scores = []
    for shift in (0, 5, 100):
        (qr, _), (_, kr) = rot(torch.tensor([[shift + 4]])).rotate(q, k), rot(torch.tensor([[shift + 1]])).rotate(q, k)
        scores.append((qr * kr).sum())
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[0], scores[2], atol=1e-4, rtol=1e-4)


def test_xpos_matches_direct_formula():
    hs, base = 8, 512.0
    pos = torch.tensor([[2, 9]])
    q, k = torch.randn(1, 1, 2, hs), torch.randn(1, 1, 2, hs)
    qx, kx = Rotary(hs, xpos_scale_base=base)(pos).rotate(q, k)
    zeta = (torch.arange(0, hs, 2).float() + 0.4 * hs) / (1.4 * hs)
    freqs = 10000.0 ** (-torch.arange(0, hs, 2).float() / hs)
    for x, out, sign in ((q, qx, 1.0), (k, kx, -1.0)):
        z = torch.complex(x[..., 0::2], x[..., 1::2])  # interleaved pairs (x[2i], x[2i+1])
        p = pos[0, :, None].float()
        expected = z * torch.polar(zeta ** (sign * p / base), p * freqs)
        torch.testing.assert_close(out, torch.stack((expected.real, expected.imag), -1).flatten(-2),
                                   atol=1e-5, rtol=1e-5)


def test_xpos_score_decays_with_distance_and_is_relative():
    """xPos is RoPE's rotation with the query scaled by zeta**(i / base) and the key by zeta**(-j / base)
    (zeta < 1 per pair of dimensions), so a query-key score shrinks by zeta**((i - j) / base): the farther
    the key, the smaller the score; the same for every shift of both positions."""
    hs, base = 16, 512.0
    rot = Rotary(hs, xpos_scale_base=base)
    zeta = (torch.arange(0, hs, 2).float() + 0.4 * hs) / (1.4 * hs)
    q, k = torch.randn(1, 1, 1, hs), torch.randn(1, 1, 1, hs)

    def pair_scale(i, j):  # per pair of dimensions: |q_i| |k_j| over |q| |k| (the rotation keeps lengths)
        (qr, _), (_, kr) = rot(torch.tensor([[i]])).rotate(q, k), rot(torch.tensor([[j]])).rotate(q, k)
        size = lambda x: x.view(hs // 2, 2).norm(dim=-1)  # noqa: E731
        return size(qr) * size(kr) / (size(q) * size(k))

    def score(i, j):
        (qr, _), (_, kr) = rot(torch.tensor([[i]])).rotate(q, k), rot(torch.tensor([[j]])).rotate(q, k)
        return float((qr * kr).sum())

    scales = [pair_scale(3 + d, 3) for d in (0, 1, 10, 100, 1000)]
    torch.testing.assert_close(scales[0], torch.ones(hs // 2))
    for near, far in zip(scales, scales[1:]):
        assert (far < near).all(), (near, far)  # every pair decays with distance
    torch.testing.assert_close(scales[3], zeta ** (100 / base))
    assert math.isclose(score(10, 3), score(110, 103), rel_tol=1e-4)


def test_alibi_slopes_and_bias():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 6 heads: the 4 power-of-two slopes, then every other slope of the 8-head series
    expected6 = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    assert torch.allclose(alibi_slopes(6), torch.tensor(expected6))
    pos = torch.tensor([[0, 1, 2]])
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    bias = ALiBi(8)(mask, pos, pos, torch.float32)
    assert bias[0, 0, 2, 0] == -0.5 * 2 and bias[0, 7, 2, 1] == -(2.0 ** -8)
    assert bias[0, 3, 0, 2] == float("-inf")


def test_position_constants_stay_float32_when_the_model_is_cast():
    """model.to(bfloat16) casts float buffers: a bf16 RoPE frequency or ALiBi slope is wrong by up to 2**-9 of
    itself, i.e. a rotation 0.7 rad off or an attention bias ~3 off at position 4000."""
    import polymodal as pm
    from polymodal.config import DecoderConfig

    for positions in ("rope", "xpos", "alibi"):
        model = pm.build(DecoderConfig(vocab_size=16, dim=32, n_layers=1, n_heads=16, hidden_dim=32,
                                       positions=positions, max_seq_len=8192))
        exact = {name: b.clone() for name, b in model.named_buffers()}
        model.bfloat16()
        for name, b in model.named_buffers():
            assert b.dtype == torch.float32 and torch.equal(b, exact[name]), name
    pos = torch.arange(4096)[None]
    cast = Rotary(64, 10000.0).to(torch.bfloat16)
    assert torch.equal(cast(pos, torch.bfloat16).cos_q, Rotary(64, 10000.0)(pos, torch.bfloat16).cos_q)


def test_learned_positions_add_the_row_of_each_tokens_position():
    """Learned (GPT-2's): the input of the first block is the token's embedding plus row p of a table, p counted
    from each row's first real token (left padding shifts it) -- the same model with no positions, given
    those sums, gives the same logits."""
    import polymodal as pm
    from polymodal.config import DecoderConfig

    torch.manual_seed(0)
    shape = dict(vocab_size=32, dim=16, n_layers=2, n_heads=4, hidden_dim=32, max_seq_len=16)
    learned = pm.build(DecoderConfig(positions="learned", **shape)).eval()
    plain = pm.build(DecoderConfig(positions="none", **shape)).eval()
    torch.nn.init.normal_(learned.pos_embeddings.weight, std=1.0)  # rows far apart: a shifted row shows
    plain.load_state_dict({k: v for k, v in learned.state_dict().items() if not k.startswith("pos_embeddings")})
    ids = torch.randint(0, 32, (2, 7))
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, :3] = 0  # row 1 left-padded: its first real token is at position 0
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        got = learned(ids, attention_mask=attention_mask).logits
        summed = learned.tok_embeddings(ids) + learned.pos_embeddings.weight[positions]
        want = plain(inputs_embeds=summed, attention_mask=attention_mask).logits
        shifted = plain(inputs_embeds=learned.tok_embeddings(ids) + learned.pos_embeddings.weight[:7],
                        attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (got - want)[real].abs().max() <= 1e-5
    assert (got - shifted)[1, 3:].abs().max() > 1e-2  # row 1 counted from its padding would differ
