"""Multi-process training helpers over `torch.distributed` (gloo on CPU, NCCL on CUDA).

The same script runs single-process (no process group: every helper is then a no-op) or under
`torchrun --nproc_per_node N`, which sets RANK / WORLD_SIZE / LOCAL_RANK. Models are wrapped
with FSDP2 (`fully_shard` per transformer block, then the root) or DDP.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule

from polymodal.errors import ConfigError


@dataclass(frozen=True)
class Process:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_process(device: str = "auto") -> Process:
    """Joins the torchrun process group when launched by torchrun; picks this process's device."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but torch sees no CUDA device")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Process(rank, world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def shutdown() -> None:
    """Leaves the process group. What still holds it (a DDP model, a device mesh caught in a reference
    cycle) is collected first, so gloo's threads stop here and not during interpreter exit, where
    their teardown can abort the process."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def data_and_context_split(proc: Process, context: int) -> tuple[int, int, DeviceMesh | None]:
    """(data-parallel rank, data-parallel size, context-parallel mesh) when each sequence is split over
    `context` processes: a 2-D mesh (data x context), in which the processes of a context group read the same
    documents. With context 1: every process is its own data-parallel rank, and there is no mesh."""
    if context < 1 or proc.world_size % context:
        raise ConfigError(f"context parallel over {context} processes needs a multiple of {context} processes "
                         f"(torchrun --nproc_per_node), got {proc.world_size}")
    if context == 1:
        return proc.rank, proc.world_size, None
    mesh = init_device_mesh(proc.device.type, (proc.world_size // context, context), mesh_dim_names=("data", "context"))
    return mesh.get_local_rank("data"), mesh.size(0), mesh["context"]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def gather_objects(obj) -> list:
    """Every rank's `obj` (JSON-like values), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def parallelize(model: nn.Module, mode: str, blocks: list[nn.Module]) -> nn.Module:
    """FSDP2 (each block sharded on its own, so only one block's full weights live at a time)
    or DDP; the model itself when there is one process."""
    if not dist.is_initialized():
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        return fully_shard(model)
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    raise ConfigError(f"parallel must be fsdp or ddp, got {mode!r}")


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient reduction on all but the last micro-batch of an accumulated step."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield
