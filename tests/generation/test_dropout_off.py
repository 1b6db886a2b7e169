"""Dropout trains, never decodes: `generate` on a model left in training mode (as `pm.build` returns it)
gives the tokens of the same model in eval mode, and hands the model back in the mode it was in."""

import torch

import polymodal as pm


def test_generate_turns_dropout_off_and_restores_the_mode():
    cfg = pm.PRESETS["kosmos-tiny"]()
    cfg = cfg.replace(text=cfg.text.replace(dropout=0.5))  # KOSMOS-1 trains with dropout (0.1)
    torch.manual_seed(0)
    model = pm.build(cfg)
    assert model.training
    ids = torch.randint(6, cfg.text.vocab_size, (2, 5))
    with torch.no_grad():  # in training mode, dropout makes two forwards differ
        assert not torch.equal(model(ids).logits, model(ids).logits)
    first = pm.generate(model, ids, max_new_tokens=8)
    second = pm.generate(model, ids, max_new_tokens=8)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert torch.equal(first, second) and torch.equal(first, pm.generate(model, ids, max_new_tokens=8))
