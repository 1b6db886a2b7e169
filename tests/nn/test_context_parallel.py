"""PyTorch's context parallel (FlexAttention form) over a real 2-process `torchrun` (gloo, CPU): a Gemini
model and a decoder whose sequence is split across the processes give the logits of one process running
the whole sequence, under causal, padding, packed-document and prefix-block masks. (PyTorch 2.13 has no
CPU backward for FlexAttention, so training through context parallel is not tested here.)"""

import json
from pathlib import Path

WORKER = Path(__file__).with_name("context_parallel_worker.py")


def test_two_processes_match_one_process(tmp_path, torchrun):
    torchrun(WORKER, tmp_path, timeout=600)
    for rank in (0, 1):
        *results, wrong_backend = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert wrong_backend["error"].startswith("context parallel needs the decoder built with backend='flex'")
        assert [r["case"] for r in results] == ["gemini causal", "gemini padding", "gemini packed",
                                                "decoder prefix blocks, no padding"]
        for r in results:
            assert r["shape_ok"], r
            assert r["max_diff"] <= 1e-4, (rank, r)
            assert r["max_logit"] > 0.1, r  # the logits compared are not all zero

