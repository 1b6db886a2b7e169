"""The logit processors against HF's LogitsProcessor classes on the same logits: top-p at its edges (ties, p near
0 and 1, a 256k vocabulary), the whole sampling chain in HF's order, and bf16 logits with a repetition penalty."""

import pytest
import torch

from polymodal.generation.choice import Chooser
from polymodal.generation.sampling import top_p_filter

logits_process = pytest.importorskip("transformers.generation.logits_process",
                                     reason="transformers is the parity reference")


def hf_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    return logits_process.TopPLogitsWarper(p)(None, logits.clone())


@pytest.mark.parametrize("p", [1e-8, 1e-3, 0.3, 0.9, 0.99, 0.999, 1 - 1e-7])
def test_top_p_keeps_what_hf_keeps_with_ties_and_p_at_the_edges(p):
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        vocab = int(torch.randint(2, 60, (), generator=g))
        if trial % 2:  # few distinct values: many ties, which HF breaks by its sort order
            logits = torch.randint(-3, 3, (4, vocab), generator=g).float()
        else:
            logits = torch.randn(4, vocab, generator=g) * float(torch.rand((), generator=g) * 5)
        assert torch.equal(top_p_filter(logits, p), hf_top_p(logits, p)), (trial, vocab)


@pytest.mark.parametrize("p", [0.99, 0.9999])
def test_top_p_on_a_gemma_sized_vocabulary(p):
    """A float32 sum of 256k probabilities from the largest down reaches 1 early: summed that way, thousands of
    tokens HF (and an exact float64 count) keep were dropped."""
    logits = torch.randn(1, 256_000, generator=torch.Generator().manual_seed(0)) * 3
    probs = logits.double().softmax(-1).sort(descending=True).values[0]
    exact = int(((probs.cumsum(0) - probs) < p).sum())
    kept = top_p_filter(logits, p).isfinite()
    assert torch.equal(kept, hf_top_p(logits, p).isfinite())
    assert int(kept.sum()) == exact


def kept_by_sampling(logits: torch.Tensor, **sampling) -> torch.Tensor:
    """(V,) bool: the tokens a sampling `Chooser` can draw from logits (V,). Row j of a batch of copies gets Exp(1)
    noise that is tiny on token j only: the exponential race then picks j exactly when j has probability > 0."""
    V = logits.shape[-1]
    noise = torch.ones(V, V)
    noise.fill_diagonal_(1e-30)
    return Chooser(do_sample=True, **sampling).pick(logits.expand(V, V), None, None, noise)[0] == torch.arange(V)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 10, 0.9), (1.5, 4, 0.5), (0.5, 100, 0.95), (2.0, None, 0.8),
                                                     (1.0, 3, None)])
def test_sampling_chain_keeps_what_hf_keeps(temperature, top_k, top_p):
    """temperature -> top-k -> top-p, in HF's order (a different order keeps different tokens)."""
    g = torch.Generator().manual_seed(1)
    chain = [logits_process.TemperatureLogitsWarper(temperature)]
    if top_k is not None:
        chain.append(logits_process.TopKLogitsWarper(top_k))
    if top_p is not None:
        chain.append(logits_process.TopPLogitsWarper(top_p))
    for _ in range(10):
        logits = torch.randn(1, 40, generator=g) * 2
        theirs = logits_process.LogitsProcessorList(chain)(None, logits.clone())[0].isfinite()
        ours = kept_by_sampling(logits[0], temperature=temperature, top_k=top_k, top_p=top_p)
        assert torch.equal(ours, theirs)


def test_repetition_penalty_on_bf16_logits_chooses_as_hf():
    """HF's generate runs its processors on float32 logits. 1.0 / 1.3 rounded to bf16 ties 0.77 (bf16): greedy then
    kept the penalised token; in float32 it loses."""
    logits = torch.tensor([[1.0, 0.77], [0.5, 0.3846]], dtype=torch.bfloat16)
    seen_ids = torch.tensor([[0], [0]])
    seen = torch.zeros(2, 2, dtype=torch.bool).scatter_(1, seen_ids, True)
    expected = logits_process.RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.float()).argmax(-1)
    token, *_ = Chooser(penalty=1.3).choose(logits, torch.zeros(2, dtype=torch.bool), None, seen, None)
    assert token.tolist() == expected.tolist() == [1, 1]


def test_repetition_penalty_then_sampling_on_bf16_logits_matches_hf_chain():
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        logits = (torch.randn(1, 64, generator=g) * 2).to(torch.bfloat16)
        seen_ids = torch.randint(0, 64, (1, 12), generator=g)
        seen = torch.zeros(1, 64, dtype=torch.bool).scatter_(1, seen_ids, True)
        chain = logits_process.LogitsProcessorList([logits_process.RepetitionPenaltyLogitsProcessor(1.2),
                                                    logits_process.TemperatureLogitsWarper(0.8),
                                                    logits_process.TopKLogitsWarper(20),
                                                    logits_process.TopPLogitsWarper(0.9)])
        theirs = chain(seen_ids, logits.float())[0].isfinite()
        V = 64
        noise = torch.ones(V, V)
        noise.fill_diagonal_(1e-30)
        chooser = Chooser(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, penalty=1.2)
        token, *_ = chooser.choose(logits.expand(V, V), torch.zeros(V, dtype=torch.bool), None, seen.expand(V, V),
                                   noise)
        assert torch.equal(token == torch.arange(V), theirs)
