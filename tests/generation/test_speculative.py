"""Speculative decoding (`generate(assistant_model=..., prompt_lookup_num_tokens=...)`): greedy output equals the
target's own, sampled tokens follow the target's law (chi-square), rollback leaves the cache as plain decoding
fills it, and bad drafting options fail before any compute."""

import math

import pytest
import torch
import torch._dynamo

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.generation import speculative
from polymodal.generation.sampling import apply_repetition_penalty, probabilities
from polymodal.nn.transformer import Decoder
from polymodal.presets import get_preset


def decoder(seed: int, vocab: int = 97, layers: int = 2) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(DecoderConfig(vocab_size=vocab, dim=32, n_layers=layers, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                 max_seq_len=128)).eval()


def near(model: Decoder, seed: int, scale: float) -> Decoder:
    """A draft that agrees with the target often but not always: its weights plus noise."""
    draft = decoder(seed, model.config.vocab_size, model.config.n_layers)
    draft.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return draft


@pytest.fixture(scope="module")
def target():
    return decoder(0)


@pytest.fixture(scope="module")
def close(target):
    return near(target, 1, 0.1)


def ragged(vocab: int = 97):
    """Four prompts: full, left-padded, right-padded, and one that repeats itself (prompt lookup finds it)."""
    ids = torch.randint(0, vocab, (4, 9), generator=torch.Generator().manual_seed(1))
    ids[3] = torch.tensor([5, 6, 7, 8, 5, 6, 7, 8, 5])
    am = torch.ones_like(ids)
    am[1, :3] = 0
    am[2, 6:] = 0
    return ids, am


@pytest.mark.parametrize("drafter", ["near", "unrelated", "lookup"])
def test_greedy_equals_target_alone_with_rows_stopping_apart(target, close, drafter):
    ids, am = ragged()
    plain = pm.generate(target, ids, am, max_new_tokens=16)
    stops = [int(plain[0, 3]), int(plain[2, 8])]  # two rows stop early, at different rounds; two run on
    kw = dict(max_new_tokens=16, eos_token_id=stops, pad_token_id=0)
    expected = pm.generate(target, ids, am, **kw)
    assert (expected == 0).any(1).sum() >= 2
    draft = dict(near=dict(assistant_model=close, num_assistant_tokens=4),
                 unrelated=dict(assistant_model=decoder(2, layers=1), num_assistant_tokens=3),
                 lookup=dict(prompt_lookup_num_tokens=3))[drafter]
    assert torch.equal(pm.generate(target, ids, am, **kw, **draft), expected)
    assert torch.equal(pm.generate(target, ids, am, max_new_tokens=16, **draft), plain)  # no stop: every row runs


def test_rows_accept_different_counts(target, close):
    """Counted from the target's forwards: with a near draft some rounds keep several drafts, and batch rows
    need not agree (the batch finishes in as many rounds as its slowest row alone)."""
    ids, am = ragged()
    rounds = []
    hook = target.register_forward_hook(lambda *_: rounds.append(1))
    try:
        alone = []
        for i in range(4):
            rounds.clear()
            row = ids[i][am[i].bool()][None]
            pm.generate(target, row, max_new_tokens=16, assistant_model=close, num_assistant_tokens=4)
            alone.append(len(rounds) - 1)  # the prefill is not a round
        rounds.clear()
        pm.generate(target, ids, am, max_new_tokens=16, assistant_model=close, num_assistant_tokens=4)
    finally:
        hook.remove()
    assert min(alone) < 15 / 2  # drafts were kept: fewer rounds than one token each would take
    assert len(set(alone)) > 1 and len(rounds) - 1 == max(alone)


def test_paligemma_target_with_text_only_and_same_family_drafts():
    torch.manual_seed(0)
    cfg = get_preset("paligemma-tiny")
    model = pm.build(cfg).eval()
    text_draft = Decoder(cfg.text.replace(n_layers=1)).eval()
    family_draft = pm.build(cfg.replace(text=cfg.text.replace(n_layers=1))).eval()
    n_img = cfg.tokens_per_image
    text = torch.randint(0, 200, (3, 6), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([torch.full((3, n_img), cfg.image_token_id), text], dim=1)
    am = torch.ones_like(ids)
    am[1, n_img:n_img + 2] = 0  # pads between image and text (the engine moves them to the front)
    am[2, -2:] = 0
    px = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    expected = pm.generate(model, ids, am, pixel_values=px, max_new_tokens=12)
    for draft in (text_draft, family_draft):
        out = pm.generate(model, ids, am, pixel_values=px, max_new_tokens=12, assistant_model=draft,
                          num_assistant_tokens=3)
        assert torch.equal(out, expected)


def test_a_text_only_draft_of_kosmos_reads_the_text_around_the_image():
    """The draft reads the prompt with the slots an image fills masked out, and nothing else: KOSMOS-1's
    `<image>` and `</image>` around them are text a text decoder reads (the placeholder ids come from the
    family's spec); greedy decoding with it is the target's own."""
    torch.manual_seed(0)
    cfg = get_preset("kosmos-tiny")
    model = pm.build(cfg).eval()
    draft = Decoder(cfg.text.replace(n_layers=1)).eval()
    n = cfg.perceiver.n_latents
    text = torch.randint(10, 200, (2, 5), generator=torch.Generator().manual_seed(4))
    image = torch.tensor([cfg.image_token_id, *[cfg.placeholder_token_id] * n, cfg.image_end_token_id])
    ids = torch.cat([text[:, :2], image.expand(2, -1), text[:, 2:]], dim=1)
    px = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    shown = speculative.draft_prompt(speculative.Drafting(3, draft), model, ids, None, {"pixel_values": px})
    assert torch.equal(shown["attention_mask"], (ids != cfg.placeholder_token_id).long())
    expected = pm.generate(model, ids, pixel_values=px, max_new_tokens=10)
    out = pm.generate(model, ids, pixel_values=px, max_new_tokens=10, assistant_model=draft, num_assistant_tokens=3)
    assert torch.equal(out, expected)


def test_compiled_equals_eager_and_compiles_once():
    """One layer each: compile time grows with the layers. The second call reuses the graphs of the first."""
    target = decoder(0, layers=1)
    ids, am = ragged()
    kw = dict(max_new_tokens=12, assistant_model=near(target, 1, 0.1), num_assistant_tokens=3)
    eager = pm.generate(target, ids, am, **kw)
    assert torch.equal(eager, pm.generate(target, ids, am, max_new_tokens=12))
    assert torch.equal(pm.generate(target, ids, am, **kw, compile=True), eager)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(pm.generate(target, ids, am, **kw, compile=True), eager)


def test_rollback_leaves_the_cache_plain_decoding_fills(target):
    """Rows write 4 tokens and keep 4, 1 and 2 of them: each row's visible slots hold the K/V and positions
    of the row decoded alone, and the next token's logits match; so after squeezing the holes out."""
    ids, am = ragged()
    ids, am = ids[:3], am[:3]
    order = am.argsort(dim=1, stable=True)
    ids, am = ids.gather(1, order), am.gather(1, order)  # left-aligned, as the engine gives it
    new = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(4))
    kept = torch.tensor([4, 1, 2])
    nxt = torch.tensor([[11], [12], [13]])
    with torch.no_grad():
        cache = target.make_cache(3, 20)
        target(ids, attention_mask=am, cache=cache)
        target(new, cache=cache)
        cache.rollback(4, kept)
        assert int(cache.fill) == ids.shape[1] + 4 and cache.length == int(cache.fill)
        logits = target(nxt, cache=cache).logits[:, -1]
        for b in range(3):
            alone = target.make_cache(1, 20)
            row = torch.cat([ids[b][am[b].bool()], new[b, :int(kept[b])], nxt[b]])[None]
            alone_logits = target(row, cache=alone).logits[0, -1]
            torch.testing.assert_close(logits[b], alone_logits, atol=1e-5, rtol=1e-5)
            mine = cache.slots.valid[b]
            assert int(mine.sum()) == alone.length
            torch.testing.assert_close(cache.slots.positions[b][mine], alone.slots.positions[0, :alone.length])
            for layer, ref in zip(cache.layers, alone.layers):
                torch.testing.assert_close(layer.k[b][:, mine], ref.k[0, :, :alone.length], atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(layer.v[b][:, mine], ref.v[0, :, :alone.length], atol=1e-6, rtol=1e-5)
        before = target(nxt, cache=cache).logits[:, -1]
        cache.rollback(1, torch.zeros(3, dtype=torch.long))  # take that step back: a full-batch rollback
        cache.compact()
        assert int(cache.fill) == max(int(am[b].sum()) + int(kept[b]) + 1 for b in range(3))
        assert cache.length == int(cache.fill) and not cache.slots.valid[:, int(cache.fill):].any()
        torch.testing.assert_close(target(nxt, cache=cache).logits[:, -1], before, atol=1e-5, rtol=1e-5)


def chi_square_bound(dof: int, z: float = 3.719) -> float:
    """The chi-square quantile at 1 - 1e-4 (z of the normal), by Wilson and Hilferty's approximation."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    expected = probs * n
    cells = expected >= 5
    return float(((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum()), int(cells.sum()) - 1


@pytest.mark.parametrize("drafter", ["model", "lookup"])
def test_sampled_tokens_follow_the_target_distribution(drafter):
    """6 tokens, 6000 rows of one prompt, every processor on: the 2nd and 3rd new tokens (drafted and checked)
    against the target's exact law, enumerated. The draft's own law fails the same test."""
    V, n, kw = 6, 6000, dict(temperature=0.8, top_k=5, top_p=0.95, repetition_penalty=1.3)
    target, draft = decoder(0, V, 1), decoder(5, V, 1)
    prompt = torch.tensor([[1, 2, 1]])
    drafting = (dict(assistant_model=draft, num_assistant_tokens=2) if drafter == "model"
                else dict(prompt_lookup_num_tokens=2))
    out = pm.generate(target, prompt.expand(n, -1), max_new_tokens=3, do_sample=True, seed=0, **kw, **drafting)

    def law(model: Decoder) -> torch.Tensor:
        """P(t1, t2, t3) (V, V, V) under the model with the processors, by enumeration."""
        seqs = torch.cartesian_prod(*[torch.arange(V)] * 3)  # (V**3, 3)
        full = torch.cat([prompt.expand(len(seqs), -1), seqs], 1)
        with torch.no_grad():
            logits = model(full).logits[:, 2:5]  # predicting t1, t2, t3
        seen = torch.zeros(len(seqs), 3, V, dtype=torch.bool)
        for j in range(3):
            seen[:, j].scatter_(1, full[:, :3 + j], True)
        p = probabilities(apply_repetition_penalty(logits, seen, kw["repetition_penalty"]),
                          temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"])
        return p.gather(2, seqs[..., None])[..., 0].prod(1).view(V, V, V)

    truth, wrong = law(target), law(draft)
    pairs = torch.bincount(out[:, 1] * V + out[:, 2], minlength=V * V).float()
    stat, dof = chi_square(pairs, truth.sum(0).flatten(), n)
    assert stat < chi_square_bound(dof)
    if drafter == "model":
        wrong_stat, dof = chi_square(pairs, wrong.sum(0).flatten(), n)
        assert wrong_stat > chi_square_bound(dof)


def test_bad_drafting_options_fail_before_compute(target):
    ids = torch.tensor([[1, 2, 3]])
    calls = []
    hook = target.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"draft's vocabulary \(50 tokens\) must be the target's \(97 tokens\)"):
            pm.generate(target, ids, assistant_model=decoder(1, vocab=50))
        for k in (0, -2):
            with pytest.raises(ValueError, match=f"num_assistant_tokens must be an int >= 1, got {k}"):
                pm.generate(target, ids, assistant_model=decoder(1), num_assistant_tokens=k)
            with pytest.raises(ValueError, match=f"prompt_lookup_num_tokens must be an int >= 1, got {k}"):
                pm.generate(target, ids, prompt_lookup_num_tokens=k)
        with pytest.raises(ValueError, match="not both"):
            pm.generate(target, ids, assistant_model=decoder(1), prompt_lookup_num_tokens=3)
        with pytest.raises(ValueError, match="assistant_model is the target itself"):
            pm.generate(target, ids, assistant_model=target)
        with pytest.raises(ValueError, match="num_assistant_tokens needs an assistant_model"):
            pm.generate(target, ids, num_assistant_tokens=3)
    finally:
        hook.remove()
    assert not calls
