"""Prefill + step-by-step cached decode == the full uncached forward, for every decoder variant."""

import pytest
import torch

from polymodal.config import DecoderConfig
from polymodal.nn.transformer import Decoder

VARIANTS = {
    "llama-gqa": dict(n_kv_heads=2),
    "gemma-mqa": dict(n_kv_heads=1, head_dim=32, mlp="geglu", norm="rmsnorm_gemma", tie_embeddings=True,
                      embed_scale=True),
    "alibi": dict(positions="alibi"),
    "xpos-subln": dict(positions="xpos", norm="layernorm", norm_placement="sub", mlp="gelu"),
    "learned-postln": dict(positions="learned", norm="layernorm", norm_placement="post", mlp="gelu"),
    "nopos-qknorm": dict(positions="none", qk_norm="rmsnorm"),
}


def tiny(**overrides) -> Decoder:
    cfg = DecoderConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_seq_len=64, **overrides)
    return Decoder(cfg).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decode_equals_full_forward_at_every_step(name):
    model = tiny(**VARIANTS[name])
    ids = torch.randint(0, 97, (2, 12))
    am = torch.ones_like(ids)
    am[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        full = model(ids, attention_mask=am).logits
        cache = model.make_cache(2, 12)
        steps = [model(ids[:, :5], attention_mask=am[:, :5], cache=cache).logits]
        for t in range(5, 12):
            steps.append(model(ids[:, t:t + 1], cache=cache).logits)
    cached = torch.cat(steps, dim=1)
    valid = am.bool()
    torch.testing.assert_close(cached[valid], full[valid], atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_a_clear_error():
    model = tiny()
    cache = model.make_cache(1, 4)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 4 tokens; it has 4 and was given 1 more"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        model.make_cache(1, 65)
