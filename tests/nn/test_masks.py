"""Truth tables for the one mask system (big_vision's make_attn_mask examples, plus docs and padding)."""

import torch

from polymodal.nn.masks import attention_mask, make_segments


def table(**kwargs) -> list[list[int]]:
    ref = next(v for v in kwargs.values() if v is not None)
    seg = make_segments(1, ref.shape[1], ref.device, **kwargs)
    return attention_mask(seg, seg)[0, 0].int().tolist()


def t(*rows):
    return torch.tensor([rows[0]]) if len(rows) == 1 else torch.tensor(rows)


def test_causal():
    assert table(attention_mask=t([1, 1, 1])) == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_prefix_lm():
    # two prefix tokens see each other; the suffix is causal and sees the prefix
    assert table(block_ids=t([1, 1, 0, 0])) == [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ]


def test_bidirectional_block_in_the_middle_cannot_see_the_future():
    # text, image block of 2, text: the block sees itself and the past, not the last token
    assert table(block_ids=t([0, 2, 2, 0])) == [
        [1, 0, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ]


def test_two_adjacent_blocks_stay_apart():
    assert table(block_ids=t([1, 1, 2, 2])) == [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 1, 1, 1],
    ]


def test_packed_documents_do_not_see_each_other():
    assert table(document_ids=t([0, 0, 1, 1])) == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 1, 1],
    ]


def test_padding_is_never_seen_and_pad_rows_are_not_empty():
    rows = table(attention_mask=t([0, 1, 1]))
    assert [r[0] for r in rows[1:]] == [0, 0]
    assert rows[1:] == [[0, 1, 0], [0, 1, 1]]
    assert all(any(r) for r in rows)  # a pad query row is never all-False (no NaN softmax)


def test_positions_reset_per_document_and_skip_padding():
    seg = make_segments(2, 6, torch.device("cpu"), attention_mask=t([0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]),
                        document_ids=t([0, 0, 0, 0, 0, 0], [3, 3, 3, 7, 7, 9]))
    assert seg.positions[0, 2:].tolist() == [0, 1, 2, 3]
    assert seg.positions[1].tolist() == [0, 1, 2, 0, 1, 0]


def test_a_mask_of_another_shape_than_the_input_is_a_clear_error():
    import pytest

    import polymodal as pm

    with pytest.raises(ValueError, match=r"attention_mask must have the shape of the input \(batch, seq\) = \(2, 5\), "
                                         r"got \(2, 4\)"):
        make_segments(2, 5, torch.device("cpu"), attention_mask=torch.ones(2, 4))
    for preset in ("llama-tiny", "flamingo-tiny"):  # forward, not only generate, says which input is wrong
        with pytest.raises(ValueError, match="attention_mask must have the shape"):
            pm.build(preset)(torch.randint(100, 200, (2, 5)), attention_mask=torch.ones(2, 4, dtype=torch.long))
    # HF's single row of position ids for the whole batch still applies to every row
    seg = make_segments(2, 3, torch.device("cpu"), position_ids=torch.tensor([[4, 5, 6]]))
    assert seg.positions.tolist() == [[4, 5, 6], [4, 5, 6]]
