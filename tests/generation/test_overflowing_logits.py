"""A model whose activations overflow (float16 past 65504) gives NaN or inf logits; greedy decoding then wrote
token 0 at every step (or the first +inf's) and generate returned it as an answer. Now generate stops after the
prompt with a one-line error."""

import pytest
import torch

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.errors import InputError


def overflowing_model(where: str):
    """A tiny decoder whose first MLP's output ("mlp": NaN logits follow) or output head ("head": +-inf logits)
    passes float16's range, finite in float32."""
    model = pm.build(DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=32,
                                   eos_token_id=5)).eval()
    with torch.no_grad():
        if where == "mlp":
            model.layers[0].mlp.w_out.weight.mul_(30000)
            model.layers[0].mlp_norm.weight.mul_(100)
        else:
            model.norm.weight.mul_(1000)
            model.output.weight.mul_(1000)
    return model


@pytest.mark.parametrize("where, overflow", [("mlp", torch.isnan), ("head", torch.isposinf)])
def test_nan_or_inf_logits_after_the_prompt_are_an_error_not_an_answer(where, overflow):
    model, ids = overflowing_model(where), torch.randint(6, 64, (2, 8))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
        assert overflow(model.half()(ids).logits).any(-1).all()  # the case: float16 values past 65504
    for sampling in ({}, {"do_sample": True, "seed": 1}):
        with pytest.raises(InputError, match=r"the model's logits after the prompt hold NaN or inf \(rows \[0, 1\]\): its "
                                             r"torch.float16 activations overflowed or its weights hold NaN; load it "
                                             r"in bfloat16 or float32"):
            pm.generate(model, ids, max_new_tokens=4, **sampling)
    assert pm.generate(model.float(), ids, max_new_tokens=4).shape[0] == 2  # the same model in float32 answers
