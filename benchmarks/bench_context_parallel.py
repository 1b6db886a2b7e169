"""Long context on CPU: ring attention (context parallel over W processes) against one process and against
PyTorch's own context parallel. Launches `torchrun --nproc_per_node W` (gloo, 1 thread per process) for each W.

A tiny decoder (llama-tiny: 2 layers, dim 64, 4 heads, GQA 2, vocab 512), batch 1, a plain causal mask, the
same weights and tokens everywhere; every path's logits are asserted equal to the ring's (1e-4) before any
timing. Per W it reports:
- memory, per process, of one training step (forward + backward) at --seq tokens and at --seq / 2: the
  activations autograd keeps for backward (exact: saved_tensors_hooks, parameters excluded, each storage
  once), and the peak rise of the process's resident memory during the step (sampled every 1 ms, glibc made
  to return freed tensors: transient tiles included);
- per-step time at --time-seq tokens (median of --repeats, interleaved): the training step and the forward of
  ring attention over W processes (eager); the forward of PyTorch's context parallel (FlexAttention over the
  same W processes) eager, its reference path that materialises every score, and with every block compiled
  (Inductor: FlexAttention's fused CPU forward and the rest of the block), the way it is meant to run
  (forward only: PyTorch has no FlexAttention backward on CPU); and, once, one process with SDPA (train step
  and forward), the reference everything is compared to.
A memory bound, not a trained length: the sequence at which the peak rise would fill --budget-gb per process,
extrapolated linearly from seq/2 and seq (no tensor of ring attention grows faster than the sequence, but
nothing that long was run).

    python benchmarks/bench_context_parallel.py                    # S = 16k memory, 4k timing, W = 1, 2, 4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from polymodal.nn.context_parallel import context_parallel
from polymodal.nn.transformer import Block, Decoder
from polymodal.families.decoder.presets import llama_tiny
from polymodal.train.distributed import init_process, shutdown

sys.path.insert(0, str(Path(__file__).parent))
from same_work import require  # noqa: E402
from timing import measure  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """The highest resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self):
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.rise = self.peak - self.base


def step_memory(model: torch.nn.Module, seq: int) -> dict:
    """One training step: the activations saved for backward, and the peak rise of resident memory."""
    ids = torch.randint(0, 512, (1, seq))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with PeakRSS() as peak:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return {"saved_mb": sum(storages.values()) / 2**20, "peak_rise_mb": peak.rise / 2**20}


def worker(args) -> None:
    torch.set_num_threads(1)
    proc = init_process("cpu")
    if not dist.is_initialized():  # one process: still a group, so that the ring runs (with no one to pass to)
        dist.init_process_group("gloo")
    world = dist.get_world_size()
    cfg = llama_tiny().replace(max_seq_len=max(args.seq, args.time_seq))
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    ring = context_parallel(Decoder(cfg), mesh)
    flex, compiled = (context_parallel(Decoder(cfg, backend="flex"), mesh) for _ in range(2))
    for model in (flex, compiled):
        model.load_state_dict(ring.state_dict())
    for block in [m for m in compiled.modules() if isinstance(m, Block)]:  # Inductor: FlexAttention's fused CPU
        block.compile()                                                     # forward, and the rest of the block
    ids = torch.randint(0, 512, (1, args.time_seq))
    with torch.no_grad():  # the same logits (hence the same work) from every path, before any timing
        logits = {name: m(ids).logits for name, m in (("ring", ring), ("PyTorch context parallel", flex),
                                                      ("PyTorch context parallel compiled", compiled))}
    for name, x in logits.items():
        require(name, torch.allclose(x, logits["ring"], atol=1e-4, rtol=0),
                f"logits differ from the ring's by {(x - logits['ring']).abs().max().item():.1e}")
    step_memory(ring, 256)  # first-call allocations out of the way
    result = {"world": world, "memory": {s: step_memory(ring, s) for s in (args.seq // 2, args.seq)}}

    def train(model):
        model(ids, labels=ids).loss.backward()

    def forward(model):
        with torch.no_grad():
            model(ids)

    fns = {"ring train step": lambda: train(ring), "ring forward": lambda: forward(ring),
           "pytorch context parallel forward": lambda: forward(flex),
           "pytorch context parallel compiled forward": lambda: forward(compiled)}
    result["seconds"] = measure(fns, "cpu", args.repeats)
    if world == 1:
        alone = Decoder(cfg)
        alone.load_state_dict(ring.state_dict())
        with torch.no_grad():
            diff = (alone(ids).logits - logits["ring"]).abs().max().item()
        require("one process, SDPA", diff <= 1e-4, f"logits differ from the ring's by {diff:.1e}")
        result["one process memory"] = {s: step_memory(alone, s) for s in (args.seq // 2, args.seq)}
        result["one process seconds"] = measure({"sdpa train step": lambda: train(alone),
                                                 "sdpa forward": lambda: forward(alone)}, "cpu", args.repeats)
    peaks = torch.tensor([m["peak_rise_mb"] for m in result["memory"].values()])
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)  # the busiest process
    for m, peak in zip(result["memory"].values(), peaks.tolist()):
        m["peak_rise_mb"] = peak
    if proc.main:
        Path(args.worker).write_text(json.dumps(result))
    del ring, flex, compiled, mesh
    dist.barrier()
    shutdown()


def launch(world: int, args, out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave RSS
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, "--worker", str(out), "--seq", str(args.seq),
           "--time-seq", str(args.time_seq), "--repeats", str(args.repeats)]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def longest(memory: dict, budget_mb: float, processes: int = 1) -> int:
    """Tokens at which `processes` processes, each at the peak rise, fill the budget: the line from the peak at the
    larger measured size, its slope per token the steeper of the peak rise's and the saved activations'."""
    (s1, m1), (s2, m2) = sorted((int(s), m) for s, m in memory.items())
    slope = max((m2[k] - m1[k]) / (s2 - s1) for k in ("peak_rise_mb", "saved_mb"))
    return int(s2 + (budget_mb / processes - m2["peak_rise_mb"]) / slope)


def report(results: list[dict], args) -> None:
    one = results[0]
    base_mem, base_s = one["one process memory"][str(args.seq)], one["one process seconds"]
    print(f"\nmemory per process, one training step at {args.seq} tokens (busiest process), and the memory bound "
          f"it extrapolates to (linear from {args.seq // 2} and {args.seq} tokens; not run):")
    print("| processes | saved activations | peak RSS rise | vs one process (SDPA) | memory bound, "
          f"{args.budget_gb:g} GB per process | memory bound, the processes sharing {args.budget_gb:g} GB |")
    print("|---|---|---|---|---|---|")
    budget = args.budget_gb * 1024
    print(f"| 1, SDPA (no context parallel) | {base_mem['saved_mb']:.0f} MB | {base_mem['peak_rise_mb']:.0f} MB | 1.00 | "
          f"~{longest(one['one process memory'], budget) / 1e6:.1f}M tokens | same |")
    for r in results:
        m = r["memory"][str(args.seq)]
        print(f"| {r['world']}, ring | {m['saved_mb']:.0f} MB | {m['peak_rise_mb']:.0f} MB | "
              f"{m['peak_rise_mb'] / base_mem['peak_rise_mb']:.2f} | ~{longest(r['memory'], budget) / 1e6:.1f}M tokens | "
              f"~{longest(r['memory'], budget, r['world']) / 1e6:.1f}M tokens |")
    print(f"\nseconds per step at {args.time_seq} tokens (median of {args.repeats}, interleaved; W processes share "
          f"this machine's {os.cpu_count()} cores):")
    print("| processes | ring train step | ring forward | PyTorch context parallel forward, eager | the same, "
          "blocks compiled | ring fwd / PyTorch compiled fwd |\n|---|---|---|---|---|---|")
    print(f"| 1, SDPA (no context parallel) | {base_s['sdpa train step']:.3f} | {base_s['sdpa forward']:.3f} "
          "| — | — | — |")
    for r in results:
        s = r["seconds"]
        print(f"| {r['world']} | {s['ring train step']:.3f} | {s['ring forward']:.3f} | "
              f"{s['pytorch context parallel forward']:.3f} | {s['pytorch context parallel compiled forward']:.3f} | "
              f"{s['ring forward'] / s['pytorch context parallel compiled forward']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=16384, help="tokens of the memory measurement")
    p.add_argument("--time-seq", type=int, default=4096, help="tokens of the timing")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-gb", type=float, default=24.0, help="memory per process of the memory bound")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.worlds[0] != 1:
        p.error("--worlds must start with 1: one process is the reference")
    with tempfile.TemporaryDirectory() as tmp:
        results = [launch(w, args, Path(tmp) / f"w{w}.json") for w in args.worlds]
    print(json.dumps(results))
    report(results, args)


if __name__ == "__main__":
    main()
