"""Run by test_sigmoid_loss_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Every rank builds the same model and the same global batch, computes the reference (loss and
gradients of the whole batch in this one process), then the distributed run (its own slice of the
batch, the loss over all ranks, DDP averaging the gradients), and writes the differences to
OUT/rank{rank}.json.
"""

import copy
import json
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

import polymodal as pm
from polymodal.train.distributed import all_reduce_sum, barrier, init_process, shutdown

PER_RANK = 3


def compare(preset: str, chunks: int, rank: int, world: int) -> dict:
    cfg = pm.PRESETS[preset]()
    if cfg.loss == "sigmoid":  # SigLIP starts at bias -10, where negatives barely count; make them count
        cfg = cfg.replace(logit_bias_init=-1.0)
    torch.manual_seed(0)
    model = pm.build(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.text.vocab_size, (PER_RANK * world, 10), generator=g)
    ids[:, -1] = 2  # <eos>
    px = torch.randn(PER_RANK * world, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)

    reference = copy.deepcopy(model)
    ref_loss = reference(ids, px).loss
    ref_loss.backward()

    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    ddp = DistributedDataParallel(model)
    loss = ddp(ids[mine], px[mine], chunks=chunks, all_ranks=True).loss
    loss.backward()
    with torch.no_grad():  # what the loss would be if each rank saw only its own texts
        local_loss = all_reduce_sum(model(ids[mine], px[mine], chunks=chunks).loss) / world
    mean_loss = all_reduce_sum(loss.detach()) / world
    grad_diff = max((p.grad - r.grad).abs().max().item()
                    for p, r in zip(model.parameters(), reference.parameters()))
    return {"preset": preset, "chunks": chunks, "ref_loss": ref_loss.item(), "loss": mean_loss.item(),
            "local_loss": local_loss.item(), "loss_diff": abs(mean_loss.item() - ref_loss.item()),
            "grad_diff": grad_diff, "max_grad": max(r.grad.abs().max().item() for r in reference.parameters())}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    proc = init_process("cpu")
    results = [compare(preset, chunks, proc.rank, proc.world_size)
               for preset, chunks in (("siglip-tiny", 1), ("siglip-tiny", 2), ("clip-tiny", 1))]
    (out / f"rank{proc.rank}.json").write_text(json.dumps(results, indent=1))
    barrier()  # no process leaves the group while the other is still in a collective
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
