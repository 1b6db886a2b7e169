"""A packed call (`PagedCache.packed`): every sequence's new tokens in one row, no padding, attention per
sequence. Its logits equal the padded call's and a new sequence's prefill's (fp32, 1e-5) for rotary, learned
positions and xPos with sub-LN and qk-norm; a new sequence's slots get the segments its prefill writes; a decoder
that needs rows (ALiBi) says it does not pack and refuses a packed call."""

import pytest
import torch

from polymodal.nn.paged_cache import PagedCache
from polymodal.nn.transformer import Decoder
from polymodal.config import DecoderConfig

VARIANTS = {
    "rope-gqa": dict(n_kv_heads=2),
    "learned-postln": dict(positions="learned", norm="layernorm", norm_placement="post", mlp="gelu"),
    "xpos-subln-qknorm": dict(positions="xpos", norm="layernorm", norm_placement="sub", qk_norm="rmsnorm"),
}


def tiny(**overrides) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_seq_len=64, **overrides)
    return Decoder(cfg).eval()


def started(model, prompts: list[torch.Tensor]) -> PagedCache:
    """A cache holding each prompt as a sequence of its own (0, 1, ...), prefilled alone, and sequence 9, new."""
    cache = PagedCache.for_model(model, 32, 4)
    for seq, prompt in enumerate(prompts):
        cache.add(seq)
        model(prompt, cache=cache.batch([seq]))
    cache.add(9)
    return cache


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_a_packed_call_equals_the_padded_call_and_a_prefill(name):
    model = tiny(**VARIANTS[name])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (1, n), generator=g) for n in (5, 3, 7)]
    # decode rows of one token (out of order between chunk rows), chunks of 4 and 2, a new prompt of 6
    feeds = [torch.randint(0, 97, (1, n), generator=g) for n in (1, 4, 1, 6)]
    seqs = [0, 1, 2, 9]
    padded = started(model, prompts)
    tokens = torch.zeros(3, 4, dtype=torch.long)
    for b, feed in enumerate(feeds[:3]):
        tokens[b, :feed.shape[1]] = feed[0]
    expected = model(tokens, cache=padded.step([0, 1, 2], 4, new_tokens=[1, 4, 1]), logits_to_keep=0).logits
    expected = [expected[0, :1], expected[1], expected[2, :1], model(feeds[3], cache=padded.batch([9])).logits[0]]

    packed = started(model, prompts)
    every = torch.arange(12)
    got = model(torch.cat(feeds, 1), cache=packed.packed(seqs, [f.shape[1] for f in feeds]), logits_to_keep=every)
    torch.testing.assert_close(got.logits[0], torch.cat(expected), atol=1e-5, rtol=1e-5)
    last = model(torch.cat(feeds, 1), cache=started(model, prompts).packed(seqs, [1, 4, 1, 6]),
                 logits_to_keep=torch.tensor([0, 4, 5, 11])).logits[0]  # the head at the rows' last tokens only
    torch.testing.assert_close(last, torch.stack([e[-1] for e in expected]), atol=1e-5, rtol=1e-5)

    assert packed.lengths == padded.lengths == {0: 6, 1: 7, 2: 8, 9: 6}
    for seq in seqs:  # the same slots' segments, so the prefix cache files a packed prompt's blocks as a prefill's
        slots = torch.tensor([packed.slot(seq, i) for i in range(packed.lengths[seq])])
        for field in ("positions", "groups", "docs", "valid"):
            assert getattr(packed.segments, field)[slots].tolist() == getattr(padded.segments, field)[slots].tolist()
    for pool, other in zip(packed.k + packed.v, padded.k + padded.v):  # the null block takes the padding's
        torch.testing.assert_close(pool[4:], other[4:], atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_decode_steps_of_a_packed_cache_extend_the_one_token_rows_table():
    """The one-token rows' table is kept across packed steps (a chunk row beside them leaves it alone), and the
    logits stay those of each sequence's full forward."""
    model = tiny()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 97, (1, 5), generator=g), torch.randint(0, 97, (1, 12), generator=g)
    cache = started(model, [a])
    cache.add(1)
    model(b[:, :4], cache=cache.packed([1], [4]))
    tables = []
    for t in range(2):
        step = cache.packed([0, 1], [1, 4])
        tables.append(step.slots.groups[0].slot_index)
        token = torch.tensor([[7 + t]])
        a = torch.cat([a, token], 1)
        logits = model(torch.cat([token, b[:, 4 + 4 * t:8 + 4 * t]], 1), cache=step, logits_to_keep=0).logits[0]
        torch.testing.assert_close(logits[0], model(a).logits[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1:], model(b[:, :8 + 4 * t]).logits[0, -4:], atol=1e-5, rtol=1e-5)
    assert tables[1][:, :-1].tolist() == tables[0].tolist()  # extended by one column
    assert cache.last.seq_ids == [0]


@torch.no_grad()
def test_a_decoder_that_needs_rows_does_not_pack():
    model = tiny(positions="alibi")
    assert not model.packs and tiny().packs
    cache = started(model, [torch.tensor([[1, 2, 3]])])
    with pytest.raises(ValueError, match="a packed call attends per row.*ALiBi"):
        model(torch.tensor([[4, 5]]), cache=cache.packed([0, 9], [1, 1]))
