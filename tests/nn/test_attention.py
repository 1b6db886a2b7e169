import pytest
import torch

import polymodal as pm
from polymodal.nn.attention import Attention, attend
from polymodal.nn.masks import attention_mask, make_segments
from polymodal.nn.norms import RMSNorm
from polymodal.nn.transformer import Decoder


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (4, 1)])
def test_sdpa_equals_eager_with_mask(n_heads, n_kv):
    q = torch.randn(2, n_heads, 7, 16)
    k, v = torch.randn(2, n_kv, 7, 16), torch.randn(2, n_kv, 7, 16)
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    seg = make_segments(2, 7, q.device, attention_mask=am)
    mask = attention_mask(seg, seg)
    out = attend(q, k, v, mask, backend="sdpa")
    ref = attend(q, k, v, mask, backend="eager")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_heads():
    q = torch.randn(1, 4, 5, 8)
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    grouped = attend(q, k, v, is_causal=True, backend="eager")
    full = attend(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, backend="eager")
    torch.testing.assert_close(grouped, full)


def test_is_causal_fast_path_equals_causal_mask():
    attn = Attention(32, 4, 2)
    x = torch.randn(2, 9, 32)
    seg = make_segments(2, 9, x.device)
    torch.testing.assert_close(attn(x, is_causal=True), attn(x, mask=attention_mask(seg, seg)), atol=1e-6, rtol=1e-5)


def test_causal_output_ignores_future_tokens():
    attn = Attention(32, 4, backend="eager")
    x = torch.randn(1, 6, 32)
    y = x.clone()
    y[:, 4:] += 1.0
    out_x, out_y = attn(x, is_causal=True), attn(y, is_causal=True)
    torch.testing.assert_close(out_x[:, :4], out_y[:, :4])
    assert not torch.allclose(out_x[:, 4:], out_y[:, 4:])


def test_cross_attention_uses_media_and_caches_kv():
    from polymodal.nn.cache import CrossKV

    attn = Attention(32, 4, kv_dim=24)
    x, media = torch.randn(2, 5, 32), torch.randn(2, 3, 24)
    kv = CrossKV()
    first = attn(x, media, cache=kv)
    again = attn(x, None, cache=kv)  # decode steps reuse the cached media K/V
    torch.testing.assert_close(first, again)
    with pytest.raises(ValueError, match="cross-attention needs media"):
        attn(x, None)


def test_qk_norm_normalises_each_head():
    attn = Attention(32, 4, qk_norm=RMSNorm(8), k_norm=RMSNorm(8), backend="eager")
    big = attn(torch.randn(1, 4, 32) * 1000, is_causal=True)
    assert torch.isfinite(big).all()


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        Attention(32, 4, backend="flash3")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        Attention(32, 4, 3)


def test_flex_backend_equals_sdpa_under_every_mask_kind_and_in_cached_decoding():
    """The flex backend (masks.block_mask) gives the sdpa decoder's logits with padding, a prefix block and
    packed documents at once, and its cached greedy decoding equals sdpa's."""
    torch.manual_seed(0)
    cfg = pm.DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    sdpa, flex = Decoder(cfg).eval(), Decoder(cfg, backend="flex").eval()
    flex.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 64, (2, 20))
    pad = torch.ones(2, 20, dtype=torch.long)
    pad[1, :3] = 0
    blocks, docs = torch.zeros(2, 20, dtype=torch.long), torch.ones(2, 20, dtype=torch.long)
    blocks[:, 4:9], docs[0, 12:] = 1, 2
    kwargs = dict(attention_mask=pad, block_ids=blocks, document_ids=docs)
    with torch.no_grad():
        want, got = sdpa(ids, **kwargs).logits, flex(ids, **kwargs).logits
    torch.testing.assert_close(got[pad.bool()], want[pad.bool()], atol=1e-5, rtol=1e-5)
    assert (want[0, 12] - sdpa(ids).logits[0, 12]).abs().max() > 1e-3  # the mask kinds do change the logits
    prompt = ids[:, :6]
    assert torch.equal(pm.generate(flex, prompt, max_new_tokens=5), pm.generate(sdpa, prompt, max_new_tokens=5))


def test_flex_backend_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="flex backend is for self-attention"):
        Attention(32, 4, kv_dim=16, backend="flex")
    with pytest.raises(ValueError, match="needs a masks.block_mask"):
        Attention(32, 4, backend="flex")(torch.randn(1, 3, 32), is_causal=True)


@pytest.mark.parametrize("S,chunk,left", [(11, 4, 4), (8, 4, 0), (3, 5, 7)])
def test_local_window_by_chunks_equals_a_dense_band(S, chunk, left):
    """Chunked sliding-window attention (soft-capped, per-dim scaled) == the same scores over a dense (S, S)
    band mask: the blocks and contexts only save work."""
    from polymodal.nn.masks import LocalWindow

    torch.manual_seed(0)
    attn = Attention(16, 2, per_dim_scale=True, softcap=2.0)
    torch.nn.init.normal_(attn.per_dim_scale)
    x, valid = torch.randn(2, S, 16), torch.ones(2, S, dtype=torch.bool)
    valid[1, S - 2:] = False
    window = LocalWindow(chunk, left)
    got = attn(x, mask=window.mask(valid), window=window)
    t = torch.arange(S)
    band = (t[:, None] - t[None, :] >= 0) & (t[:, None] - t[None, :] <= left) & valid[:, None, :]
    band = band | ~band.any(-1, keepdim=True)
    want = attn(x, mask=band[:, None])
    assert (got - want)[valid].abs().max() <= 1e-6
