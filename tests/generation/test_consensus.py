"""Uncertainty-routed chain-of-thought: k chains per prompt in one batched generate, the majority answer where
its share reaches the threshold, else the greedy answer without a chain; the threshold chosen on validation."""

from collections import Counter

import pytest
import torch

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.generation.consensus import Votes, route, select_threshold, uncertainty_routed, vote
from polymodal.nn.transformer import Decoder
from polymodal.presets import get_preset

V = 12


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=V, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                 max_seq_len=64)).eval()


def last_even(tokens: list[int]) -> int | None:
    """A user's extraction rule: the last even token written, if any."""
    even = [t for t in tokens if t % 2 == 0]
    return even[-1] if even else None


PROMPTS = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])


def test_chains_are_one_batched_generate_and_the_majority_is_theirs(model):
    batches = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: batches.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        votes = vote(model, PROMPTS, extract=last_even, k=6, max_new_tokens=5, seed=3)
    finally:
        hook.remove()
    assert set(batches) == {3 * 6} and len(batches) == 5  # one prefill and 4 steps, all 18 chains at once
    chains = pm.generate(model, PROMPTS.repeat_interleave(6, 0), max_new_tokens=5, do_sample=True, seed=3)
    for b in range(3):
        counts = Counter(a for a in map(last_even, chains[6 * b:6 * b + 6].tolist()) if a is not None)
        top = max(counts.values())
        assert votes.share[b] == top / 6 and counts[votes.majority[b]] == top


def test_routes_follow_the_threshold(model):
    direct = torch.tensor([[1, 1, 2], [4, 4, 5], [7, 7, 8]])
    kw = dict(extract=last_even, k=5, max_new_tokens=6, seed=1, direct_input_ids=direct)
    greedy = [last_even(r) for r in pm.generate(model, direct, max_new_tokens=6).tolist()]
    always = uncertainty_routed(model, PROMPTS, threshold=0.0, **kw)
    never = uncertainty_routed(model, PROMPTS, threshold=float("inf"), **kw)
    assert always.routes == ["consensus"] * 3 and always.answers == always.votes.majority
    assert never.routes == ["greedy"] * 3 and never.answers == greedy
    middle = sorted(always.votes.share)[1]  # the prompts below the middle share go greedy
    routed = uncertainty_routed(model, PROMPTS, threshold=middle, **kw)
    for b in range(3):
        sure = routed.votes.share[b] >= middle
        assert routed.routes[b] == ("consensus" if sure else "greedy")
        assert routed.answers[b] == (routed.votes.majority[b] if sure else greedy[b])
        assert routed.greedy[b] == (None if sure else greedy[b])  # greedy runs only where it is needed


def test_a_vision_language_model_answers_directly_from_its_own_inputs():
    """PaliGemma's token_type_ids follow the tokens: the direct prompts, shorter than the chains', bring theirs."""
    torch.manual_seed(0)
    cfg = get_preset("paligemma-tiny")
    model = pm.build(cfg).eval()
    image = torch.full((2, cfg.tokens_per_image), cfg.image_token_id)
    chains, direct = torch.cat([image, torch.randint(0, 200, (2, 6))], 1), torch.cat([image, PROMPTS[:2, :2]], 1)
    px = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    kw = dict(extract=last_even, k=3, max_new_tokens=4, seed=0, direct_input_ids=direct, threshold=float("inf"))
    routed = uncertainty_routed(model, chains, pixel_values=px, token_type_ids=torch.zeros_like(chains), **kw,
                                direct_model_inputs=dict(pixel_values=px, token_type_ids=torch.zeros_like(direct)))
    greedy = pm.generate(model, direct, pixel_values=px, token_type_ids=torch.zeros_like(direct), max_new_tokens=4)
    assert routed.routes == ["greedy"] * 2 and routed.answers == [last_even(r) for r in greedy.tolist()]


def test_threshold_selection_maximises_validation_accuracy():
    votes = Votes(majority=[1, 2, 3, 4], share=[1.0, 0.5, 0.75, 0.25])
    greedy, truth = [0, 2, 0, 4], [1, 2, 0, 4]
    threshold, accuracy = select_threshold(votes, greedy, truth)
    assert (threshold, accuracy) == (1.0, 1.0)  # only the unanimous vote is right where greedy is wrong
    for t in sorted({*votes.share, float("inf")}):  # no candidate does better
        answers, _ = route(votes, greedy, t)
        assert sum(a == y for a, y in zip(answers, truth)) / 4 <= accuracy
    with pytest.raises(ValueError, match="must cover the same prompts"):
        select_threshold(votes, greedy[:3], truth)


def test_bad_input(model):
    with pytest.raises(ValueError, match="k \\(chains per prompt\\) must be >= 1, got 0"):
        vote(model, PROMPTS, extract=last_even, k=0)
    with pytest.raises(ValueError, match="pixel_values has 2 entries for 3 prompts"):
        vote(model, PROMPTS, extract=last_even, k=2, pixel_values=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="threshold is a share of the k chains"):
        uncertainty_routed(model, PROMPTS, extract=last_even, threshold=1.5)
