"""PyTorch's context parallel (FlexAttention form) over a real 2-process `torchrun` (gloo, CPU): a Gemini
model and a decoder whose sequence is split across the processes give the logits of one process running
the whole sequence, under causal, padding, packed-document and prefix-block masks. (PyTorch 2.13 has no
CPU backward for FlexAttention, so training through context parallel is not tested here.)
Load balancing is checked in-process: under a causal mask, each process's share of the attention work."""

import json
from pathlib import Path

import pytest
import torch

from polymodal.nn.context_parallel import split_order
from polymodal.nn.masks import make_segments, visible

WORKER = Path(__file__).with_name("context_parallel_worker.py")


def test_two_processes_match_one_process(tmp_path, torchrun):
    torchrun(WORKER, tmp_path, timeout=600)
    for rank in (0, 1):
        *results, wrong_backend = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert wrong_backend["error"].startswith("context parallel needs the decoder built with backend='flex'")
        assert [r["case"] for r in results] == ["gemini causal", "gemini padding", "gemini packed",
                                                "decoder prefix blocks, contiguous slices"]
        for r in results:
            assert r["shape_ok"], r
            assert r["max_diff"] <= 1e-4, (rank, r)
            assert r["max_logit"] > 0.1, r  # the logits compared are not all zero



def work_per_process(seg, world: int, load_balance: bool) -> list[int]:
    """(query, key) pairs each process attends to, its queries being its share of the split sequence."""
    order = split_order(seg.groups.shape[1], world, load_balance)
    share = order.view(world, -1)
    return [int(visible(seg[:, rows], seg).sum()) for rows in share]


@pytest.mark.parametrize("world", [2, 4])
def test_load_balance_evens_causal_work(world):
    n = 2 * world * 128
    seg = make_segments(1, n, torch.device("cpu"))  # plain causal
    contiguous, balanced = work_per_process(seg, world, False), work_per_process(seg, world, True)
    assert sum(contiguous) == sum(balanced) == n * (n + 1) // 2
    assert max(contiguous) / min(contiguous) > 2 * world - 2  # the last slice's queries see the most keys
    assert max(balanced) / min(balanced) < 1.01, balanced


def test_split_order_is_a_permutation_of_whole_chunks():
    order = split_order(1024, 4, True)
    assert sorted(order.tolist()) == list(range(1024))
    assert order.view(4, 2, 128)[:, :, 0].tolist() == [[0, 896], [128, 768], [256, 640], [384, 512]]
    assert torch.equal(split_order(1024, 4, False), torch.arange(1024))
