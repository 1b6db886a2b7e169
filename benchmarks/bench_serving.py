"""vLLM-style serving figures (as `vllm bench serve` reports them) for `polymodal serve` over HTTP, against the
static-slot batcher it replaced and against `transformers serve --continuous-batching`.

Two request sets, each sent alike to every server of its part, streamed, all greedy, by one asyncio client on raw
HTTP that timestamps each event as its bytes arrive (`stream_client`, as vLLM's aiohttp client):
- **mixed** (text + image): `--requests` chat completions to gemini-tiny that reads images (random weights, a BPE
  trained on the world's texts: `bench_batcher.world_reader`); one in four a world question alone, the others one
  of `--images` world images followed by one of the world's four image questions (so requests share images, and
  an image with its question), max_tokens 8..24. Served by `polymodal serve` (the paged, prefix-cached batcher)
  and by the same server on the static-slot batcher (`serve_static.py`).
- **text only**: `--requests` completions of world texts to bench_serve's llama-tiny checkpoint (written once as
  a polymodal directory and once through polymodal's HF converter), max_tokens 16..64. Served by `polymodal
  serve` and by `transformers serve --continuous-batching`, which cannot read the image model: its rows are
  text only.
Each server is its own process, one OMP thread, started once with `--slots` = the highest concurrency. Load
points: fixed concurrency (a closed loop: `--concurrency` requests in flight) and fixed request rates (an open
loop: Poisson arrivals, seeded, `--rates`). At each load point the servers of a part take turns (the order
rotated), `--rounds` times, so a change in the shared machine's load falls on all of them; a server's figures
are over all its runs. Figures (`serving_stats`): TTFT, TPOT,
ITL, end-to-end latency (mean, median, p99), requests/s, output tokens/s, output tokens per CPU second of the
server process (from /proc: what the machine's load does not inflate), and goodput under the SLOs given. HF's
continuous-batching KV cache is given the blocks ours has (its default takes 60% of the machine's memory).

Same work, asserted before any figure is printed: at every load point each request's answer text and token
count (the server's usage) are equal on both servers of a part, whose requests are all greedy with the same
max_tokens; HF's log shows every request served with
continuous batching and ours report the slots they were started with.

In-process, on the mixed set laid out by the server's own prompt builder, at each concurrency: the peak KV
cache bytes per running request, from the caches' allocated bytes (paged: the blocks held at the step with the
most per running request, at the pool's allocated bytes per block; static: its whole cache, allocated up front,
over its slots), and the paged batcher's prefix-cache hit rate beside the rate the workload's construction
predicts (`bench_batcher.serve`, `bench_batcher.predicted_hit_rate`).

    python benchmarks/bench_serving.py --requests 128 --rounds 4   # the README's tables (CPU, 11 minutes, 2 cores)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

import polymodal as pm
import bench_batcher  # the scripts beside this one
import bench_serve
from polymodal.data.synthetic import PROMPTS
from polymodal.generation.batching import Batcher, Request
from polymodal.serve.app import Server
from polymodal.serve.protocol import Limits, chat_job
from same_work import require, same_lengths, same_tokens
from serving_stats import Slo, summarise
from stream_client import drive

QUESTIONS = tuple(PROMPTS[task] for task in ("caption", "colour", "shape", "count"))  # the world's image questions
FIGURES = ("ttft", "tpot", "itl", "e2e")


def reader_checkpoint(directory: Path) -> Path:
    """bench_batcher's image-reading gemini-tiny and its tokenizer, saved where `polymodal serve` reads them."""
    model, tokenizer = bench_batcher.world_reader()
    pm.save_pretrained(model, directory)
    tokenizer.save(directory)
    return directory


def mixed_bodies(n: int, n_images: int) -> list[dict]:
    """n greedy chat requests: one in four a world question alone, the others a shared world image and one."""
    uris = []
    for image in bench_batcher.world_images(n_images):
        png = io.BytesIO()
        image.save(png, format="PNG")
        uris.append("data:image/png;base64," + base64.b64encode(png.getvalue()).decode())
    rng = random.Random(0)
    bodies = []
    for i in range(n):
        content = [{"type": "text", "text": rng.choice(QUESTIONS)}]
        if i % 4:
            content.insert(0, {"type": "image_url", "image_url": {"url": rng.choice(uris)}})
        bodies.append({"messages": [{"role": "user", "content": content}], "max_tokens": rng.randint(8, 24),
                       "temperature": 0})
    return bodies


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sweep(servers: dict, urls: dict, pids: dict, loads: list[tuple[str, float]], rounds: int) -> dict:
    """{load: {server: (its runs' records, the server's CPU seconds)}}, the servers taking turns at each load point,
    `rounds` times (the order rotated at each load point and each round, so a pause of the shared machine falls on
    any of them); the answers of every server equal, request by request, in every run."""
    results = {}
    for k, load in enumerate(loads):
        results[load] = {name: ([], 0.0) for name in servers}
        for r in range(rounds):
            turn = (k + r) % len(servers)
            for name in list(servers)[turn:] + list(servers)[:turn]:
                cpu = cpu_seconds(pids[name])
                records = drive(urls[name], servers[name][1], servers[name][2], load)
                runs, used = results[load][name]
                results[load][name] = runs + [records], used + cpu_seconds(pids[name]) - cpu
        what = f"{load[0]} {load[1]:g}"
        records = {name: [r for run in runs for r in run] for name, (runs, _) in results[load].items()}
        same_lengths(f"output tokens per request, {what}", {n: [r.tokens for r in rs] for n, rs in records.items()})
        # HF's streamer never sends a trailing incomplete UTF-8 character (random weights write stray bytes)
        texts = {n: [[r.text.rstrip("\ufffd")] for r in rs] for n, rs in records.items()}
        same_tokens(f"greedy answers, {what}", texts)
        print(f"{what}: answers equal on {', '.join(results[load])}", file=sys.stderr, flush=True)
    return results


def run_part(servers: dict, loads: list, env: dict, tmp: Path, rounds: int) -> dict:
    """Starts the servers (all up at once; an idle one takes no CPU), warms each up, sweeps the loads, checks
    the modes they ran in, and stops them."""
    asked = {name: [body["max_tokens"] for body in bodies] for name, (*_, bodies) in servers.items()}
    same_lengths("max_tokens asked", asked)
    for name, (*_, bodies) in servers.items():
        require(name, all(b["temperature"] == 0 for b in bodies), "a request of its set is not greedy")
    logs = {name: tmp / f"{name.split()[0]}-{i}.log" for i, name in enumerate(servers)}
    procs, urls = {}, {}
    try:
        for name, (command, _, _) in servers.items():
            procs[name], urls[name] = bench_serve.start(command, env, logs[name])
        for name, (_, model, bodies) in servers.items():
            drive(urls[name], model, [{**b, "max_tokens": 2} for b in bodies[:4]], ("concurrency", 4))
        results = sweep(servers, urls, {name: proc.pid for name, proc in procs.items()}, loads, rounds)
        bench_serve.check_modes(servers, urls, logs, 4 + rounds * len(loads) * len(next(iter(servers.values()))[2]))
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=60)
    return results


def in_process(directory: Path, bodies: list[dict], concurrencies: list[int]) -> dict:
    """Peak KV bytes per running request (from allocated bytes: paged, the blocks held at the busiest step;
    static, its whole cache, allocated up front, over its slots) and the paged prefix-cache hit rate beside the
    predicted one, the mixed set laid out by the server's prompt builder, greedy; blocks of the server's size."""
    server = Server(directory)
    block_size = server.batcher.cache.block_size
    mix = [(inputs, wanted, 0.0, i) for i, body in enumerate(bodies)
           for inputs, wanted in server.prompts(chat_job({"model": server.name, **body}, server.name, Limits()))]
    static, _ = bench_batcher.static_batcher_class()
    out = {"predicted_hit_rate": bench_batcher.predicted_hit_rate(server.model, mix, block_size),
           "block_size": block_size, "rows": []}
    for c in concurrencies:
        paged = Batcher(server.model, slots=c, max_len=server.context, block_size=block_size)
        ours = bench_batcher.serve(paged, Request, mix, c)
        whole = static(server.model, slots=c, max_len=server.context)
        out["rows"].append({"concurrency": c, "paged_kv_bytes": ours["peak_kv_bytes_per_request"],
                            "static_kv_bytes": bench_batcher.allocated_bytes(whole.cache) / c,
                            "hit_rate": paged.cache.hit_tokens / paged.cache.prompt_tokens})
        print(f"in-process, concurrency {c}: done", file=sys.stderr, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64, help="requests per load point, set and round")
    p.add_argument("--rounds", type=int, default=1, help="runs of each load point per server, the servers taking "
                   "turns (figures over all of them)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rates", type=float, nargs="+", default=[8.0, 32.0], help="Poisson request rates, per second")
    p.add_argument("--slo-ttft-ms", type=float, default=250.0)
    p.add_argument("--slo-tpot-ms", type=float, default=25.0)
    p.add_argument("--out", default="bench_serving.json")
    args = p.parse_args()
    if args.requests < 1 or args.rounds < 1:
        p.error(f"--requests and --rounds must be at least 1, got {args.requests} and {args.rounds}")
    torch.set_num_threads(1)  # the in-process part; the servers run with OMP_NUM_THREADS=1
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    loads = [("concurrency", c) for c in args.concurrency] + [("rate", r) for r in args.rates]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    slots, queue = ["--slots", str(max(args.concurrency))], ["--max-queue", str(args.requests)]
    text = bench_serve.requests(args.requests)
    ours_text = [{**r, "prompt": r["prompt"][len("<bos>"):-1]} for r in text]  # ours adds <bos> and "\n" itself
    mixed = mixed_bodies(args.requests, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reader_dir = reader_checkpoint(tmp / "gemini-reader")
        llama, hf, _ = bench_serve.checkpoints(tmp, "tiny")
        ours = [sys.executable, "-m", "polymodal.cli", "serve"]
        static = [sys.executable, str(Path(__file__).with_name("serve_static.py"))]
        parts = {
            "mixed": {"polymodal serve (paged)": ([*ours, str(reader_dir), *slots, *queue], reader_dir.name, mixed),
                      "polymodal serve, static batcher": ([*static, str(reader_dir), *slots, *queue], reader_dir.name,
                                                          mixed)},
            "text only": {"polymodal serve (paged)": ([*ours, str(llama), *slots, *queue], llama.name, ours_text),
                          "HF transformers serve --continuous-batching": (
                              bench_serve.hf_command(hf, llama, max(args.concurrency)), str(hf), text)}}
        results = {part: run_part(servers, loads, env, tmp, args.rounds) for part, servers in parts.items()}
        memory = in_process(reader_dir, mixed, args.concurrency)
    figures = {part: {f"{kind} {value:g}": {name: summarise(runs, slo) | {"server_cpu_s": cpu}
                                            for name, (runs, cpu) in by_server.items()}
                      for (kind, value), by_server in by_load.items()} for part, by_load in results.items()}
    report(figures, memory, args)


def report(figures: dict, memory: dict, args) -> None:
    print(f"\n{args.requests} requests per load point and round, {args.rounds} round(s), greedy, streamed; CPU, one OMP thread per server; "
          f"SLO: TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms; latencies in ms, "
          "mean / median / p99; every answer and its token count equal on both servers of a part\n")
    print("| set | load | server | requests/s | output tokens/s | tokens / server CPU s | goodput (req/s) | "
          "TTFT | TPOT | ITL | end-to-end |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for part, by_load in figures.items():
        for load, by_server in by_load.items():
            for name, r in by_server.items():
                lat = " | ".join(" / ".join(f"{r[f'{f}_{s}_ms']:.1f}" for s in ("mean", "median", "p99"))
                                 for f in FIGURES)
                print(f"| {part} | {load} | {name} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.0f} | "
                      f"{r['output_tokens'] / r['server_cpu_s']:.0f} | {r['goodput_requests_per_s']:.2f} | {lat} |")
    print(f"\nIn-process, the mixed set: peak KV cache per running request (allocated bytes), prefix-cache hits "
          f"(predicted by the workload: {memory['predicted_hit_rate']:.1%}); block size {memory['block_size']}\n")
    print("| concurrency | paged KiB / request | static KiB / request | static / paged | prefix hits |\n"
          "|---|---|---|---|---|")
    for row in memory["rows"]:
        print(f"| {row['concurrency']} | {row['paged_kv_bytes'] / 1024:.0f} | {row['static_kv_bytes'] / 1024:.0f} | "
              f"{row['static_kv_bytes'] / row['paged_kv_bytes']:.1f}x | {row['hit_rate']:.1%} |")
    Path(args.out).write_text(json.dumps({"args": vars(args), "figures": figures, "memory": memory}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
