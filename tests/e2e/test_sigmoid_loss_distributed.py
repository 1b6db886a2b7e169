"""A real 2-process `torchrun` (gloo, CPU): SigLIP's ring sigmoid loss (whole and in blocks) and CLIP's
gathered softmax loss over both processes equal the one-process loss on the global batch, and the
DDP-averaged gradients equal the global batch's gradients."""

import json
from pathlib import Path

WORKER = Path(__file__).with_name("contrastive_worker.py")


def test_two_processes_match_one_process_on_the_global_batch(tmp_path, torchrun):
    torchrun(WORKER, tmp_path, timeout=120)
    for rank in (0, 1):
        for r in json.loads((tmp_path / f"rank{rank}.json").read_text()):
            case = f"rank {rank} {r['preset']} chunks={r['chunks']}"
            assert r["loss_diff"] <= 1e-5, case  # float32 sums in another order
            assert r["grad_diff"] <= 1e-5 * max(1.0, r["max_grad"]), case
            assert r["max_grad"] > 1e-3, case  # gradients that are not all ~0
            assert abs(r["local_loss"] - r["ref_loss"]) > 1e-2, case  # the other rank's texts count
