"""The pieces of next-token choice (`choice.Chooser` puts them together): temperature, top-k, top-p
(nucleus), the repetition penalty, OpenAI's frequency and presence penalties, and sampling as an exponential
race.

The logit processors follow HF transformers' definitions so greedy and seeded sampling behave as
users expect from `generate` there. Sampling is the race argmax(probs / q), q ~ Exp(1) (gpt-fast; the
same law as multinomial, with no host sync); the noise q is drawn outside a compiled step, as dynamo
does not trace generators.
"""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): divide positive / multiply negative logits of seen tokens.
    logits (B, V); seen (B, V) bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_count_penalties(logits: torch.Tensor, counts: torch.Tensor, frequency: float,
                          presence: float) -> torch.Tensor:
    """OpenAI's frequency and presence penalties: logit_j - counts_j * frequency - (counts_j > 0) * presence,
    counts_j the times token j was written so far. logits (..., V); counts (..., V) integer."""
    return logits - counts * frequency - (counts > 0) * presence


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches p (at least one token), as HF's
    TopPLogitsWarper computes it: drop the least likely tokens while their summed mass stays <= 1 - p,
    summed from the smallest up (a float32 sum from the largest down saturates near 1 and dropped
    thousands of tokens HF keeps on a 256k vocabulary), ties broken the same way."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    tail_mass = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = tail_mass <= 1 - p
    drop_sorted[..., -1:] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def exponential_noise(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exp(1) draws shaped like logits (B, V), for `race`."""
    q = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(generator=generator)
    return q.clamp_min_(torch.finfo(q.dtype).tiny)  # a 0 would make a filtered token's 0 / 0 win the argmax


def probabilities(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """The distribution (..., V) sampling draws from: temperature, then top-k, then top-p, as HF orders them."""
    # Shifted so the largest is 0 (softmax is unchanged), and the temperature kept a normal float32: 3.0 / 1e-40
    # overflowed to inf (inf - inf is NaN), and 5e-324 rounds to a float32 0 (0 / 0 is NaN); either way all NaN.
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return logits.softmax(-1)


def race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A draw from each row of probs (..., V) (unnormalised is fine) given Exp(1) noise: argmax(probs / noise)."""
    return (probs / noise).argmax(-1)
