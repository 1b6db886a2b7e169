"""A model whose activations overflow (float16 past 65504) gives NaN logits; greedy decoding then wrote token 0
at every step and generate returned it as an answer. Now generate stops after the prompt with a one-line error."""

import pytest
import torch

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.errors import InputError


def overflowing_model():
    """A tiny decoder whose first MLP's output passes float16's range (finite in float32)."""
    model = pm.build(DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=32,
                                   eos_token_id=5)).eval()
    with torch.no_grad():
        model.layers[0].mlp.w_out.weight.mul_(30000)
        model.layers[0].mlp_norm.weight.mul_(100)
    return model


def test_nan_logits_after_the_prompt_are_an_error_not_an_answer():
    model, ids = overflowing_model(), torch.randint(6, 64, (2, 8))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
        assert torch.isnan(model.half()(ids).logits).any()  # the case: float16 activations past 65504
    for sampling in ({}, {"do_sample": True, "seed": 1}):
        with pytest.raises(InputError, match=r"the model's logits after the prompt hold NaN \(rows \[0, 1\]\): its "
                                             r"torch.float16 activations overflowed or its weights hold NaN; load it "
                                             r"in bfloat16 or float32"):
            pm.generate(model, ids, max_new_tokens=4, **sampling)
    assert pm.generate(model.float(), ids, max_new_tokens=4).shape[0] == 2  # the same model in float32 answers
