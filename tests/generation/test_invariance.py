"""Property tests: a prompt gives the same logits and tokens alone, left-padded in a batch, right-padded,
or packed with other documents."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.nn.transformer import Decoder

torch.manual_seed(0)
MODEL = Decoder(DecoderConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                              max_seq_len=64)).eval()
ALIBI = Decoder(DecoderConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=64,
                              positions="alibi")).eval()

prompts = st.lists(st.lists(st.integers(0, 60), min_size=1, max_size=9), min_size=1, max_size=4)


def left_padded(rows: list[list[int]]):
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    am = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, am


@settings(max_examples=25, deadline=None)
@given(prompts, st.booleans())
def test_left_padded_batch_equals_each_prompt_alone(rows, alibi):
    model = ALIBI if alibi else MODEL
    ids, am = left_padded(rows)
    with torch.no_grad():
        batched = model(ids, attention_mask=am).logits
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row])).logits[0]
            torch.testing.assert_close(batched[i, -len(row):], alone, atol=1e-5, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(prompts)
def test_generate_batched_equals_alone_and_right_padding_equals_left(rows):
    ids, am = left_padded(rows)
    batched = pm.generate(MODEL, ids, am, max_new_tokens=5)
    width = ids.shape[1]
    right_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    right_am = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    assert torch.equal(pm.generate(MODEL, right_ids, right_am, max_new_tokens=5), batched)
    for i, row in enumerate(rows):
        assert pm.generate(MODEL, torch.tensor([row]), max_new_tokens=5)[0].tolist() == batched[i].tolist()


@settings(max_examples=25, deadline=None)
@given(prompts, st.booleans())
def test_packed_documents_equal_each_document_alone(rows, alibi):
    model = ALIBI if alibi else MODEL
    ids = torch.tensor([sum(rows, [])])
    docs = torch.tensor([sum(([i] * len(r) for i, r in enumerate(rows)), [])])
    with torch.no_grad():
        packed = model(ids, document_ids=docs).logits[0]
        start = 0
        for row in rows:
            alone = model(torch.tensor([row])).logits[0]
            torch.testing.assert_close(packed[start:start + len(row)], alone, atol=1e-5, rtol=1e-5)
            start += len(row)
