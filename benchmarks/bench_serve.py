"""`polymodal serve` beside `transformers serve --continuous-batching`: the same weights, the same requests.

A random Llama-shaped decoder with a BPE trained on the built-in world's texts (`--size tiny`: llama-tiny,
2 layers, width 64, 0.1M parameters, which measures HTTP and scheduling overhead; `--size 76m`: 12 layers,
width 768, 76M parameters, where the model's compute dominates; `--size 1b`: Llama 3.2 1B's decoder, 16 layers,
width 2048, 0.97B parameters, a model of real size) is written twice, as a polymodal directory
and through polymodal's HF converter as an HF directory. Each server is its own process with the same thread
count, and this process sends them the same requests through the `openai` client, in rounds where the
servers take turns (one runs at a time): `--requests` completions of world texts, `--concurrency` at a time,
max_tokens drawn from 16..64, all greedy (HF's continuous-batching manager takes its sampling settings from
the first request it sees and applies them to all, so one setting is what both sides can honour). HF's KV cache
is given the blocks ours has (`hf_command`).

Same work, asserted before any figure is printed: every request's answer and token count are equal on all
servers (greedy, same weights and prompt ids; both stop at EOS or max_tokens); HF's own log says that it
served every request with continuous batching (`CB: True`, one line per request) and ours reports the slots
it was started with. Rows: generated tokens/s (the servers' own usage counts), requests/s, p50/p90 latency
(request sent -> whole answer; p90 is the 90th percentile of the --requests latencies) for ours batched
(--slots = concurrency), ours one at a time (--slots 1) and HF; then the ratios. Prompts: ours lays a
completion out as `polymodal generate` does (<bos> text "\\n"); HF gets the same ids as the text "<bos>" text
"\\n" (its tokenizer adds no <bos>).

    python benchmarks/bench_serve.py                    # CPU, tiny: the README's first table
    python benchmarks/bench_serve.py --size 76m
    python benchmarks/bench_serve.py --size 1b --requests 8 --concurrency 4 --rounds 2  # 3 x 4.8 GB of RAM
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch

import polymodal as pm
from polymodal.convert.hf import save_hf
from polymodal.families.collators import fit_to_tokenizer
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.presets import get_preset
from polymodal.serve.app import Server
from same_work import require, same_lengths, same_tokens  # benchmarks/same_work.py, beside this script
from serving_stats import collector_paused, percentile  # benchmarks/serving_stats.py, beside this script

SIZES = {"tiny": {}, "76m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, hidden_dim=2048),
         "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192)}  # Llama 3.2 1B's decoder


def checkpoints(root: Path, size: str) -> tuple[Path, Path, int]:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(World(seed=0).texts(), vocab_size=320)
    model = pm.build(fit_to_tokenizer(get_preset("llama-tiny").replace(**SIZES[size]), tokenizer))
    ours, hf = root / f"llama-{size}", root / f"llama-{size}-hf"
    pm.save_pretrained(model, ours)
    save_hf(model, hf, "llama")
    for directory in (ours, hf):
        tokenizer.save(directory)
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                          "bos_token": "<bos>", "eos_token": "<eos>",
                                                          "pad_token": "<pad>"}))
    return ours, hf, sum(p.numel() for p in model.parameters())


def hf_command(hf_dir: Path, ours_dir: Path, slots: int) -> list[str]:
    """`transformers serve --continuous-batching` on CPU in float32, its KV cache given the blocks our server has
    with `slots` (as many, of the same size): HF's default takes 60% of the machine's free memory."""
    cache = Server(ours_dir, slots=slots).batcher.cache
    return ["transformers", "serve", str(hf_dir), "--continuous-batching", "--device", "cpu", "--dtype", "float32",
            "--cb-block-size", str(cache.block_size), "--cb-num-blocks", str(cache.pool.n_blocks)]


def start(command: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with log.open("w") as f:  # the server's own log, read afterwards for the mode it ran in
        proc = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    raise RuntimeError(f"{' '.join(command)} did not come up")


def timed_mix(url: str, model: str, mix: list[dict], concurrency: int) -> tuple[float, list, list, list]:
    """Wall seconds, and each request's latency, generated tokens and answer, of `mix`, `concurrency` at a time (no
    garbage collected in this process meanwhile: `collector_paused`)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def one(request: dict) -> tuple[float, int, str]:
        t = time.perf_counter()
        out = client.completions.create(model=model, **request)
        return time.perf_counter() - t, out.usage.completion_tokens, out.choices[0].text

    with collector_paused(), ThreadPoolExecutor(concurrency) as pool:
        start_s = time.perf_counter()
        results = list(pool.map(one, mix))
        wall = time.perf_counter() - start_s
    return wall, *map(list, zip(*results))


def summary(wall: float, latencies: list[float], tokens: list[int], answers: list[str]) -> dict:
    return {"tokens_per_s": sum(tokens) / wall, "requests_per_s": len(latencies) / wall, "tokens": sum(tokens),
            "p50_s": percentile(latencies, 50), "p90_s": percentile(latencies, 90)}


def requests(n: int) -> list[dict]:
    """n greedy completions of world texts (HF's layout: "<bos>" text "\\n"), max_tokens 16..64."""
    rng = random.Random(0)
    texts = World(seed=0).texts()
    return [{"prompt": "<bos>" + rng.choice(texts) + "\n", "max_tokens": rng.randint(16, 64), "temperature": 0}
            for _ in range(n)]


def check_modes(servers: dict, urls: dict, logs: dict, sent: int) -> None:
    """Each server ran in the mode its row names: HF's log has one `CB: True` line per request and no other;
    ours reports the slots it was started with."""
    for name, (command, _, _) in servers.items():
        if name.startswith("HF"):
            text = logs[name].read_text()
            cb = text.count(", CB: True")
            require(name, cb == sent and ", CB: False" not in text,
                    f"its log shows {cb} requests served with continuous batching of {sent} sent")
        else:
            slots = json.load(urllib.request.urlopen(urls[name] + "/health"))["slots"]
            require(name, slots == int(command[command.index("--slots") + 1]), f"it reports {slots} slots")


def run_rounds(servers: dict, urls: dict, rounds: int, concurrency: int) -> dict:
    """Each server's wall time, latencies, tokens and answers over the mix, in rounds: each server in turn
    (rotated), so a change in the machine's load falls on all of them."""
    totals = {name: [0.0, [], [], []] for name in servers}
    n = len(next(iter(servers.values()))[2])
    size = n // rounds
    for k in range(rounds):
        names = list(servers)[k % len(servers):] + list(servers)[:k % len(servers)]
        for name in names:
            _, model, mix = servers[name]
            wall, *per_request = timed_mix(urls[name], model, mix[k * size:(k + 1) * size], concurrency)
            totals[name][0] += wall
            for total, values in zip(totals[name][1:], per_request):
                total += values
    return totals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=list(SIZES))
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4, help="the mix is split into rounds, servers take turns")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of each server (default: %(default)s)")
    p.add_argument("--out", default="bench_serve.json")
    args = p.parse_args()
    if args.requests % args.rounds:
        p.error(f"--requests ({args.requests}) must split into --rounds ({args.rounds}) equal rounds")
    mix = requests(args.requests)
    ours_mix = [{**r, "prompt": r["prompt"][len("<bos>"):-1]} for r in mix]  # ours adds <bos> and "\n" itself
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "warning"}  # HF logs the mode of each request at this level
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, hf_dir, n_params = checkpoints(Path(tmp), args.size)
        ours = [sys.executable, "-m", "polymodal.cli", "serve", str(ours_dir), "--max-queue", str(args.requests)]
        servers = {
            "polymodal batched": (ours + ["--slots", str(args.concurrency)], ours_dir.name, ours_mix),
            "polymodal one at a time": (ours + ["--slots", "1"], ours_dir.name, ours_mix),
            "HF transformers serve --continuous-batching": (hf_command(hf_dir, ours_dir, args.concurrency),
                                                            str(hf_dir), mix),
        }
        logs = {name: Path(tmp) / f"server{i}.log" for i, name in enumerate(servers)}
        procs, urls = {}, {}
        try:
            for name, (command, _, _) in servers.items():  # all up at once; an idle server takes no CPU
                procs[name], urls[name] = start(command, env, logs[name])
            for name, (_, model, reqs) in servers.items():  # warm-up
                timed_mix(urls[name], model, [{**r, "max_tokens": 4} for r in reqs[:args.concurrency]],
                          args.concurrency)
            totals = run_rounds(servers, urls, args.rounds, args.concurrency)
            check_modes(servers, urls, logs, args.concurrency + args.requests)
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=60)
    same_lengths("tokens per request", {name: t[2] for name, t in totals.items()})
    same_tokens("greedy answers", {name: [[a] for a in t[3]] for name, t in totals.items()})
    report({name: summary(*t) for name, t in totals.items()}, args, n_params)


def report(results: dict, args, n_params: int) -> None:
    ours, alone, hf = results.values()
    print(f"\n{args.requests} greedy completions, {args.concurrency} concurrent, max_tokens 16..64; CPU, "
          f"{args.threads} thread(s) per server; a random {n_params / 1e6:.2f}M-parameter Llama-shaped decoder "
          f"({args.size}, the same weights on both sides); every answer and its token count equal on all servers; HF's log: every request "
          "served with continuous batching\n")
    print("| server | tokens/s | requests/s | p50 latency | p90 latency |\n|---|---|---|---|---|")
    for name, r in results.items():
        tokens = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] >= 100 else f"{r['tokens_per_s']:.2f}"
        print(f"| {name} | {tokens} | {r['requests_per_s']:.2f} | {r['p50_s'] * 1e3:.0f} ms | "
              f"{r['p90_s'] * 1e3:.0f} ms |")
    for label, a, b in (("ours / HF", ours, hf), ("ours batched / one at a time", ours, alone)):
        print(f"| {label} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x | "
              f"{a['requests_per_s'] / b['requests_per_s']:.2f}x | "
              f"{b['p50_s'] / a['p50_s']:.2f}x faster | {b['p90_s'] / a['p90_s']:.2f}x faster |")
    Path(args.out).write_text(json.dumps({"args": vars(args), "parameters": n_params, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
