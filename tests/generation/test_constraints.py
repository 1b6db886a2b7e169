"""The per-row image-span state machine: sampling never writes a text token inside an image span nor an
image code outside one, whatever the logits (random logits, random models, seeded sampling); rows
switch modes independently; constrained cached decoding equals constrained full-forward decoding."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import polymodal as pm
from polymodal.fusion.constraints import ImageSpans
from polymodal.families.chameleon.presets import chameleon_tiny

BEGIN, END = 6, 7


def assert_well_formed(seq: list[int], spans: ImageSpans, remaining: int = 0) -> int:
    """Parse seq as text and `begin codes*length end` spans (the last may be cut off); seq may start
    inside an image opened before it, with `remaining` of its tokens (codes, then end) to come.
    Returns the number of images closed in seq."""
    codes, L = set(spans.codes.tolist()), spans.length
    i, images = 0, 0
    if remaining:
        body, i = seq[:remaining - 1], remaining - 1
        assert all(t in codes for t in body), body
        if i < len(seq):
            assert seq[i] == spans.end, seq
            i, images = i + 1, 1
    while i < len(seq):
        t = seq[i]
        if t == spans.begin:
            body = seq[i + 1:i + 1 + L]
            assert all(c in codes for c in body), f"text inside an image span at {i}: {seq}"
            if i + 1 + L < len(seq):
                assert seq[i + 1 + L] == spans.end, f"image span at {i} not closed after {L} codes: {seq}"
                images += 1
            i += L + 2
        else:
            assert t not in codes and t != spans.end, f"image token {t} outside an image span at {i}: {seq}"
            i += 1
    return images


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), length=st.integers(1, 6), batch=st.integers(1, 4),
       n_codes=st.integers(1, 20), begin_boost=st.floats(0.0, 8.0))
def test_random_logits_never_break_spans(seed, length, batch, n_codes, begin_boost):
    g = torch.Generator().manual_seed(seed)
    V = 24 + n_codes
    codes = torch.randperm(V - 8, generator=g)[:n_codes] + 8  # anywhere above the control tokens
    spans = ImageSpans(BEGIN, END, codes, length)
    state = spans.start(torch.ones(batch, 3, dtype=torch.long))
    rows = [[] for _ in range(batch)]
    for _ in range(40):
        logits = torch.randn(batch, V, generator=g) * 3
        logits[:, BEGIN] += begin_boost
        logits[:, codes[0]] += 10.0  # a strong pull towards an image code, inside or out
        token = torch.multinomial(spans.mask(logits, state).softmax(-1), 1, generator=g).squeeze(1)
        state = spans.advance(state, token)
        for b in range(batch):
            rows[b].append(int(token[b]))
    for row in rows:
        assert_well_formed(row, spans)


def test_prompt_may_end_inside_an_image():
    spans = ImageSpans(BEGIN, END, torch.arange(10, 14), 4)
    prompts = torch.tensor([[20, 21, 22, BEGIN], [20, BEGIN, 10, 11], [BEGIN, 10, 11, END], [0, 0, 20, 21]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    assert spans.start(prompts, mask).tolist() == [5, 3, 0, 0]
    with pytest.raises(ValueError, match="ends inside an image span"):
        spans.start(torch.tensor([[BEGIN, 10, 20]]))
    with pytest.raises(ValueError, match="ends inside an image span"):
        spans.start(torch.tensor([[BEGIN, 10, 11, 12, 13, 10]]))


def test_no_begin_token_masks_codes_always():
    spans = ImageSpans(None, None, torch.arange(10, 14), 4)  # HF Chameleon checkpoints: text only
    logits = torch.zeros(2, 16)
    logits[:, 10:14] = 100.0
    state = spans.start(torch.tensor([[1, 2], [3, 4]]))
    assert spans.mask(logits, state).argmax(-1).tolist() == [0, 0]
    with pytest.raises(ValueError, match="begin and end"):
        ImageSpans(BEGIN, None, torch.arange(10, 14), 4)
    with pytest.raises(ValueError, match="must not be image codes"):
        ImageSpans(BEGIN, 11, torch.arange(10, 14), 4)


def random_model(seed: int, begin_bias: float = 5.0):
    """chameleon-tiny with 2x2-code images and random weights, pulled towards `<img>` so images happen."""
    torch.manual_seed(seed)
    cfg = chameleon_tiny()
    cfg = cfg.replace(vq=cfg.vq.replace(channel_multiplier=[1, 2, 2, 2, 2]))  # 32 px -> 2x2 codes
    model = pm.build(cfg).eval()
    with torch.no_grad():
        model.decoder.output.weight.mul_(20.0)  # peaky logits: sampling follows the model, not noise
        model.decoder.output.weight[BEGIN] += begin_bias * model.decoder.norm.weight
    return model


PROMPTS = torch.tensor([[1, 20, 21, 22, 23, BEGIN],  # opens an image: must write its codes
                        [0, 0, 0, 1, 30, 31],  # left-padded text
                        [1, 20, BEGIN, 400, 401, 402]])  # three of four codes already written
PROMPT_MASK = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1], [1] * 6])


@pytest.mark.parametrize("seed", range(4))
def test_random_models_never_break_spans(seed):
    model = random_model(seed)
    spans = model.image_spans
    inside = spans.start(PROMPTS, PROMPT_MASK)
    assert inside.tolist() == [5, 0, 2]
    out = pm.generate(model, PROMPTS, PROMPT_MASK, max_new_tokens=24, do_sample=True, temperature=1.5,
                      seed=seed, return_images=True)
    total = 0
    for b, row in enumerate(out.tokens.tolist()):
        n = assert_well_formed(row, spans, remaining=int(inside[b]))
        assert len(out.images[b]) == n
        assert all(im.size == (32, 32) for im in out.images[b])
        total += n
    assert total >= 3  # the property was exercised on real images


def test_rows_switch_modes_independently_and_cache_matches_full_forward():
    """Greedy: each row alone == the batch; and the cached constrained decode == recomputing the
    whole sequence every step with the same masks (the KV cache survives forced tokens)."""
    model = random_model(2)
    spans = model.image_spans
    batched = pm.generate(model, PROMPTS, PROMPT_MASK, max_new_tokens=20)
    for b in range(len(PROMPTS)):
        keep = PROMPT_MASK[b].bool()
        alone = pm.generate(model, PROMPTS[b:b + 1, keep], max_new_tokens=20)
        assert torch.equal(alone[0], batched[b, :alone.shape[1]])
        seq = PROMPTS[b:b + 1, keep]
        state = spans.start(seq)
        for t in range(batched.shape[1]):
            with torch.no_grad():
                logits = model(seq).logits[:, -1]
            token = spans.mask(logits, state).argmax(-1)
            assert int(token) == int(batched[b, t]), (b, t)
            state = spans.advance(state, token)
            seq = torch.cat([seq, token[:, None]], 1)
    modes = [(row == BEGIN).any() or (row == END).any() for row in batched]
    assert all(modes)  # every row wrote or finished an image, text around it


def test_return_images_needs_an_image_model():
    with pytest.raises(ValueError, match="no image_spans"):
        pm.generate(pm.build("llama-tiny"), torch.tensor([[1, 2]]), max_new_tokens=2, return_images=True)
