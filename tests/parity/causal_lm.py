"""The checks every causal LM parity test makes: on a left-padded batch, the same logits at the tokens
(fp32, <= 1e-4) and the same greedy tokens as the HF reference."""

import torch

import polymodal as pm


def batch(generator: torch.Generator | None = None):
    """(3, 10) ids over a vocabulary of 128 (3 and up: no special token), two rows left-padded with 0."""
    ids = torch.randint(3, 128, (3, 10), generator=generator)
    am = torch.ones_like(ids)
    am[1, :4] = 0
    am[2, :7] = 0
    return ids.masked_fill(am == 0, 0), am


def assert_logits_match(hf, ours) -> None:
    ids, am = batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=am).logits
        got = ours(ids, attention_mask=am).logits
    valid = am.bool()
    assert (got[valid] - expected[valid]).abs().max() <= 1e-4


def assert_greedy_matches(hf, ours) -> None:
    ids, am = batch()
    expected = hf.generate(input_ids=ids, attention_mask=am, max_new_tokens=12, do_sample=False,
                           eos_token_id=2, pad_token_id=0)[:, ids.shape[1]:]
    got = pm.generate(ours, ids, am, max_new_tokens=12, eos_token_id=2, pad_token_id=0)
    assert got[:, : expected.shape[1]].tolist() == expected.tolist()
