"""The paged KV cache against the static one: prefill + decode of ragged batches give the same logits, for a
text decoder and an image-prefix model; sequences prefilled apart decode together exactly; memory follows
the tokens held."""

import pytest
import torch

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.nn.block_pool import CacheFull
from polymodal.nn.cache import Cache
from polymodal.nn.paged_cache import PagedCache, kv_bytes
from polymodal.nn.transformer import Decoder

VARIANTS = {
    "llama-gqa": dict(n_kv_heads=2),
    "alibi": dict(positions="alibi"),
    "learned-postln": dict(positions="learned", norm="layernorm", norm_placement="post", mlp="gelu"),
}


def tiny(**overrides) -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_seq_len=64, **overrides)
    return Decoder(cfg).eval()


def run(model, cache_of, prompt: dict, steps: torch.Tensor) -> torch.Tensor:
    """Logits of a prefill of `prompt` then one decode step per column of `steps`, through the caches
    `cache_of()` gives (a fresh view per call for the paged cache, the same static cache otherwise)."""
    with torch.no_grad():
        out = [model(**prompt, cache=cache_of()).logits]
        out += [model(steps[:, t:t + 1], cache=cache_of()).logits for t in range(steps.shape[1])]
    return torch.cat(out, dim=1)


def paged_for(model, rows: int, n_blocks: int = 32, block_size: int = 4) -> tuple[PagedCache, callable]:
    cache = PagedCache.for_model(model, n_blocks, block_size)
    for seq in range(rows):
        cache.add(seq)
    return cache, lambda: cache.batch(list(range(rows)))


def compare(model, prompt: dict, attention_mask: torch.Tensor, steps: torch.Tensor) -> PagedCache:
    B, S = attention_mask.shape
    static = model.make_cache(B, S + steps.shape[1])
    expected = run(model, lambda: static, prompt, steps)
    paged, view = paged_for(model, B)
    got = run(model, view, prompt, steps)
    valid = torch.cat([attention_mask.bool(), torch.ones_like(steps, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)
    return paged


@pytest.mark.parametrize("name", list(VARIANTS))
def test_ragged_prefill_and_decode_equal_the_static_cache(name):
    model = tiny(**VARIANTS[name])
    ids = torch.randint(0, 97, (3, 9))
    am = torch.ones_like(ids)
    am[0, :4] = 0
    am[2, :6] = 0  # three prompts of 5, 9 and 3 tokens, left-padded
    paged = compare(model, dict(input_ids=ids, attention_mask=am), am, torch.randint(0, 97, (3, 4)))
    assert paged.lengths == {0: 9, 1: 13, 2: 7}  # padding takes no slot
    assert paged.pool.in_use == 3 + 4 + 2  # ceil(length / 4) blocks each


def test_image_prefix_model_ragged_batch_equals_the_static_cache():
    torch.manual_seed(0)
    model = pm.build("paligemma-tiny").eval()
    image = model.config.image_token_id
    prompts = [torch.randint(3, 500, (n,)) for n in (6, 2, 4)]
    S = 16 + 1 + 6
    ids = torch.zeros(3, S, dtype=torch.long)
    am = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        n = 16 + 1 + len(p)
        ids[row, S - n:] = torch.cat([torch.full((16,), image), torch.tensor([2]), p])
        am[row, S - n:] = 1
    prompt = dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(3, 3, 32, 32))
    paged = compare(model, prompt, am, torch.randint(3, 500, (3, 3)))
    assert paged.lengths == {0: 26, 1: 22, 2: 24}


def test_sequences_prefilled_apart_decode_together_exactly():
    """Three prompts of different lengths, each prefilled alone at its own time, then decoded in one batch:
    every row's logits are its own full forward's, with no padding or realignment anywhere."""
    model = tiny(n_kv_heads=2)
    seqs = [torch.randint(0, 97, (1, n)) for n in (3, 11, 6)]
    steps = torch.randint(0, 97, (3, 5))
    paged = PagedCache.for_model(model, 16, 4)
    with torch.no_grad():
        for seq, ids in enumerate(seqs):
            paged.add(seq)
            model(ids, cache=paged.batch([seq]))
        got = [model(steps[:, t:t + 1], cache=paged.batch([0, 1, 2])).logits for t in range(5)]
        for row, ids in enumerate(seqs):
            full = model(torch.cat([ids, steps[row:row + 1]], dim=1)).logits[0, -5:]
            torch.testing.assert_close(torch.cat(got, dim=1)[row], full, atol=1e-5, rtol=1e-5)


def test_blocks_are_given_back_and_reused():
    model = tiny()
    paged = PagedCache.for_model(model, 5, 4)  # 4 usable blocks
    with torch.no_grad():
        paged.add(0)
        model(torch.randint(0, 97, (1, 10)), cache=paged.batch([0]))
        paged.add(1)
        with pytest.raises(CacheFull, match="has 1 free blocks of 4; this write needs 2"):
            model(torch.randint(0, 97, (1, 6)), cache=paged.batch([1]))
        assert paged.tables[1] == [] and paged.lengths[1] == 0  # a refused write takes nothing
        paged.free(0)
        assert paged.pool.in_use == 0
        model(torch.randint(0, 97, (1, 6)), cache=paged.batch([1]))
    assert paged.pool.in_use == 2


def test_a_batch_does_not_mix_prefill_and_decode():
    model = tiny()
    paged = PagedCache.for_model(model, 8, 4)
    paged.add(0)
    paged.add(1)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 3)), cache=paged.batch([0]))
    with pytest.raises(ValueError, match=r"lengths \[3, 0\] mix both"):
        paged.batch([0, 1])
    with pytest.raises(ValueError, match=r"unknown \[7\]"):
        paged.batch([0, 7])


def test_a_cache_with_state_beyond_self_and_cross_attention_is_refused(monkeypatch):
    """Flamingo's cache (cross-attention media K/V, media ids and layout) pages; a cache keeping anything else
    would lose it."""
    assert PagedCache.for_model(pm.build("flamingo-tiny"), 8, 4).block_size == 4

    class Counted(Cache):
        steps = 0

    model = tiny()
    monkeypatch.setattr(model, "make_cache", lambda batch, max_len: Counted(batch, max_len, 1, 1, 1, torch.float32,
                                                                            "cpu"))
    with pytest.raises(ValueError, match=r"Decoder keeps \['steps'\] in its cache \(Counted\); the paged cache holds "
                                         "self- and cross-attention K/V only"):
        PagedCache.for_model(model, 8, 4)


def test_a_decode_step_beside_a_chunk_of_prompt():
    """`new_tokens`: one row decodes a token while another prefills the next 3 tokens of its prompt in the same
    call; both equal their full forwards."""
    model = tiny(n_kv_heads=2)
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 9))
    paged = PagedCache.for_model(model, 16, 4)
    with torch.no_grad():
        paged.add(0)
        paged.add(1)
        model(a, cache=paged.batch([0]))
        model(b[:, :6], cache=paged.batch([1]))
        step = torch.cat([torch.cat([torch.tensor([[5]]), torch.zeros(1, 2, dtype=torch.long)], 1), b[:, 6:]])
        logits = model(step, cache=paged.batch([0, 1], new_tokens=[1, 3]), logits_to_keep=0).logits
        torch.testing.assert_close(logits[0, 0], model(torch.cat([a, torch.tensor([[5]])], 1)).logits[0, -1],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1], model(b).logits[0, 6:], atol=1e-5, rtol=1e-5)
    assert paged.lengths == {0: 8, 1: 9}


def test_memory_accounting_matches_the_tensors_held():
    model = tiny(n_kv_heads=2)
    static = model.make_cache(4, 32)
    held = sum(t.nbytes for c in static.layers for t in (c.k, c.v)) + sum(t.nbytes for t in vars(static.slots).values())
    paged = PagedCache.for_model(model, 64, 8)
    assert paged.static_bytes(4, 32) == held
    pool = sum(t.nbytes for t in paged.k + paged.v) + sum(t.nbytes for t in vars(paged.segments).values())
    assert paged.pool_bytes == pool  # what `polymodal serve` says its KV cache holds
    with torch.no_grad():
        for seq, n in enumerate((3, 12, 9, 20)):
            paged.add(seq)
            model(torch.randint(0, 97, (1, n)), cache=paged.batch([seq]))
    blocks = 1 + 2 + 2 + 3
    assert paged.bytes_held() == pool // 64 * blocks == kv_bytes(blocks * 8, 2, 2, 16, torch.float32)
    assert paged.bytes_held() * (4 * 32) == paged.static_bytes(4, 32) * (blocks * 8)  # 64 slots held, not 128


def test_decode_steps_over_the_same_rows_extend_the_last_table_until_a_row_leaves():
    """A one-token step over the rows of the last call appends its slots to that call's table (a shorter row keeps
    null slots between, never read); another row set, or a freed row, builds the table anew. Every step's logits
    equal each row's full forward, and the blocks held follow the tokens."""
    model = tiny(n_kv_heads=2)
    seqs = [torch.randint(0, 97, (1, n)) for n in (3, 11, 6)]
    steps = torch.randint(0, 97, (3, 6))
    paged = PagedCache.for_model(model, 16, 4)
    widths, got = [], {0: [], 1: [], 2: []}
    with torch.no_grad():
        for seq, ids in enumerate(seqs):
            paged.add(seq)
            model(ids, cache=paged.batch([seq]))
        for t in range(6):
            if t == 4:
                paged.free(1)
                assert paged.last is None
            rows = [0, 1, 2] if t < 4 else [0, 2]
            step = paged.step(rows, 1)
            logits = model.decode(steps[rows, t:t + 1], step).logits[:, -1]
            for b, row in enumerate(rows):
                got[row].append(logits[b])
            widths.append(step.slot_index.shape[1])
        for row, ids in enumerate(seqs):
            full = model(torch.cat([ids, steps[row:row + 1]], dim=1)).logits[0, ids.shape[1]:]
            torch.testing.assert_close(torch.stack(got[row]), full[:len(got[row])], atol=1e-5, rtol=1e-5)
    assert widths == [12, 13, 14, 15, 11, 12]  # rebuilt, extended thrice; rebuilt without row 1, extended
    assert paged.lengths == {0: 9, 2: 12}
    assert [len(paged.tables[s]) for s in (0, 2)] == [3, 3] and paged.pool.in_use == 6
