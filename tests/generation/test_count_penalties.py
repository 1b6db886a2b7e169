"""OpenAI's frequency and presence penalties in the token chooser (`Chooser`, `pm.generate`): the processed
logits equal OpenAI's formula, logit_j - c_j * frequency - (c_j > 0) * presence with c_j the times token j was
written (the prompt not counted), after HF's repetition penalty (which counts the prompt) when both are on; and
greedy `generate` writes what a loop of full forwards with that formula writes."""

import pytest
import torch

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.errors import InputError
from polymodal.generation.choice import Chooser
from polymodal.nn.transformer import Decoder

logits_process = pytest.importorskip("transformers.generation.logits_process",
                                     reason="transformers is the reference for the repetition penalty")


def openai(logits: torch.Tensor, written: torch.Tensor, frequency: float, presence: float) -> torch.Tensor:
    """The formula of OpenAI's API reference, row by row; written (B, T) the tokens written so far."""
    counts = torch.stack([torch.bincount(row, minlength=logits.shape[-1]) for row in written]).float()
    return logits - counts * frequency - (counts > 0).float() * presence


@pytest.mark.parametrize("repetition, frequency, presence", [(1.0, 0.7, 0.0), (1.0, 0.0, -1.2), (1.0, 1.5, 0.4),
                                                             (1.3, 0.5, 0.9), (0.8, -0.6, 2.0)])
def test_processed_logits_are_openais_formula_after_hfs_repetition_penalty(repetition, frequency, presence):
    g = torch.Generator().manual_seed(0)
    B, V = 3, 40
    prompt = torch.randint(0, V, (B, 7), generator=g)
    written = torch.randint(0, 12, (B, 9), generator=g)  # a small range: tokens written several times
    logits = torch.randn(B, V, generator=g) * 3
    chooser = Chooser(penalty=repetition, frequency=frequency, presence=presence)
    _, seen = chooser.start(prompt, None, V)
    for j in range(written.shape[1]):
        seen = chooser.advance(None, seen, written[:, j])[1]
    expected = logits_process.RepetitionPenaltyLogitsProcessor(repetition)(torch.cat([prompt, written], 1),
                                                                            logits.clone())
    expected = openai(expected, written, frequency, presence)
    torch.testing.assert_close(chooser.processed(logits, None, seen), expected)


def test_greedy_generate_with_penalties_equals_a_loop_of_full_forwards():
    torch.manual_seed(0)
    V = 23  # a small vocabulary: greedy answers repeat tokens, so the penalties change them
    model = Decoder(DecoderConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                  max_seq_len=64)).eval()
    prompt = torch.tensor([[3, 5, 3, 7], [1, 2, 2, 2]])
    settings = dict(frequency_penalty=0.8, presence_penalty=0.3)
    out = pm.generate(model, prompt, max_new_tokens=12, **settings)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            logits = openai(model(ids).logits[:, -1], ids[:, prompt.shape[1]:], 0.8, 0.3)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids[:, prompt.shape[1]:])
    assert not torch.equal(out, pm.generate(model, prompt, max_new_tokens=12))  # the penalties changed the answer
    speculated = pm.generate(model, prompt, max_new_tokens=12, prompt_lookup_num_tokens=3, **settings)
    assert torch.equal(speculated, out)  # the counts advance through drafted and verified tokens alike


@pytest.mark.parametrize("name, value", [("frequency_penalty", 2.5), ("presence_penalty", -3), ("presence_penalty",
                                                                                                  float("nan"))])
def test_a_penalty_outside_openais_range_is_refused_before_compute(name, value):
    model = Decoder(DecoderConfig(vocab_size=11, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_seq_len=16))
    with pytest.raises(InputError, match=name):
        pm.generate(model, torch.tensor([[1, 2]]), max_new_tokens=2, **{name: value})
