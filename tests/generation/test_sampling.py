import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.generation.sampling import apply_repetition_penalty, top_k_filter, top_p_filter
from polymodal.nn.transformer import Decoder


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).eval()


def test_top_k_and_top_p_match_hf_warpers():
    logits = torch.randn(3, 40)
    ids = torch.zeros(3, 1, dtype=torch.long)
    torch.testing.assert_close(top_k_filter(logits, 5), TopKLogitsWarper(5)(ids, logits.clone()))
    for p in (0.3, 0.9):
        ours = top_p_filter(logits, p).isfinite()
        theirs = TopPLogitsWarper(p)(ids, logits.clone()).isfinite()
        assert torch.equal(ours, theirs)


def test_repetition_penalty_matches_hf():
    logits = torch.randn(2, 30)
    seen_ids = torch.tensor([[1, 5, 5, 7], [0, 2, 29, 3]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter_(1, seen_ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), expected)


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    ids = torch.randint(0, 50, (2, 4))
    a = pm.generate(model, ids, max_new_tokens=12, do_sample=True, top_k=20, top_p=0.95, seed=1)
    b = pm.generate(model, ids, max_new_tokens=12, do_sample=True, top_k=20, top_p=0.95, seed=1)
    c = pm.generate(model, ids, max_new_tokens=12, do_sample=True, top_k=20, top_p=0.95, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_one_is_greedy(model):
    ids = torch.randint(0, 50, (2, 4))
    sampled = pm.generate(model, ids, max_new_tokens=6, do_sample=True, top_k=1, temperature=0.7, seed=3)
    assert torch.equal(sampled, pm.generate(model, ids, max_new_tokens=6))


def test_stop_tokens_end_rows_independently(model):
    ids = torch.randint(0, 50, (2, 4))
    free = pm.generate(model, ids, max_new_tokens=8)
    stop = int(free[0, 2])
    out = pm.generate(model, ids, max_new_tokens=8, eos_token_id=stop, pad_token_id=49)
    first = (out[0] == stop).nonzero()[0].item()
    assert first <= 2 and (out[0, first + 1:] == 49).all()
    row1 = free[1].tolist()
    if stop not in row1:
        assert out[1].tolist() == row1[: out.shape[1]]


def test_repetition_penalty_discourages_repeats(model):
    ids = torch.randint(0, 50, (1, 3))
    plain = pm.generate(model, ids, max_new_tokens=20)[0].tolist()
    penalised = pm.generate(model, ids, max_new_tokens=20, repetition_penalty=5.0)[0].tolist()
    assert len(set(penalised)) >= len(set(plain))
    assert len(set(penalised)) > 12


def test_bad_generation_arguments(model):
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        pm.generate(model, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be a finite number > 0 and <= 1, got 1.5"):
        pm.generate(model, ids, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="attention_mask shape"):
        pm.generate(model, ids, torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="all zeros"):
        pm.generate(model, ids, torch.zeros(1, 3, dtype=torch.long))
