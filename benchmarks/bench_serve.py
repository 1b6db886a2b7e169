"""`polymodal serve` beside `transformers serve --continuous-batching`: the same weights, the same request mix.

A tiny Llama (llama-tiny with a BPE trained on the built-in world's texts) is written twice, as a polymodal
directory and through polymodal's HF converter as an HF directory. Each server is its own process with the
same thread count, and this process sends them the same mix through the `openai` client, in rounds where
the servers take turns (one runs at a time):
`--requests` completions of world texts, `--concurrency` at a time, max_tokens drawn from 16..64, half greedy,
half sampled (temperature 0.8, seeded). Rows: requests/s, generated tokens/s (the servers' own usage counts),
p50/p99 latency (request sent -> whole answer), for ours batched (--slots = concurrency), ours one at a time
(--slots 1) and HF; then the ratios. Both sides stop at EOS, so tokens/s is the fair throughput figure.
Prompts: ours lays a completion out as `polymodal generate` does (<bos> text "\\n"); HF gets the same ids
as the text "<bos>" text "\\n" (its tokenizer adds no <bos>). The greedy answers of both are compared: the
same weights and prompts must give the same text.

    python benchmarks/bench_serve.py                    # CPU, the README's table
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
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


def checkpoints(root: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(World(seed=0).texts(), vocab_size=320)
    model = pm.build(fit_to_tokenizer(get_preset("llama-tiny"), tokenizer))
    ours, hf = root / "llama-tiny", root / "llama-tiny-hf"
    pm.save_pretrained(model, ours)
    save_hf(model, hf, "llama")
    for directory in (ours, hf):
        tokenizer.save(directory)
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                          "bos_token": "<bos>", "eos_token": "<eos>",
                                                          "pad_token": "<pad>"}))
    return ours, hf


def start(command: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}")
            time.sleep(0.2)
    raise RuntimeError(f"{' '.join(command)} did not come up")


def timed_mix(url: str, model: str, mix: list[dict], concurrency: int) -> tuple[float, list[float], int, list[str]]:
    """Wall seconds, each request's latency, the generated tokens and each answer of `mix`, `concurrency` at a
    time."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def one(request: dict) -> tuple[float, int, str]:
        t = time.perf_counter()
        out = client.completions.create(model=model, **request)
        return time.perf_counter() - t, out.usage.completion_tokens, out.choices[0].text

    start_s = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, mix))
    return time.perf_counter() - start_s, [r[0] for r in results], sum(r[1] for r in results), [r[2] for r in results]


def summary(wall: float, latencies: list[float], tokens: int, answers: list[str]) -> dict:
    latencies = sorted(latencies)
    return {"requests_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall, "tokens": tokens,
            "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4, help="the mix is split into rounds, servers take turns")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of each server (default: %(default)s)")
    p.add_argument("--out", default="bench_serve.json")
    args = p.parse_args()

    rng = random.Random(0)
    texts = World(seed=0).texts()
    mix = []
    for i in range(args.requests):
        sampled = i % 2 == 1
        mix.append({"prompt": "<bos>" + rng.choice(texts) + "\n", "max_tokens": rng.randint(16, 64),
                    "temperature": 0.8 if sampled else 0, "seed": i if sampled else None})
    ours_mix = [{**r, "prompt": r["prompt"][len("<bos>"):-1]} for r in mix]  # ours adds <bos> and "\n" itself

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, hf_dir = checkpoints(Path(tmp))
        ours = [sys.executable, "-m", "polymodal.cli", "serve", str(ours_dir), "--max-queue", str(args.requests)]
        servers = {
            "polymodal batched": (ours + ["--slots", str(args.concurrency)], "llama-tiny", ours_mix),
            "polymodal one at a time": (ours + ["--slots", "1"], "llama-tiny", ours_mix),
            "HF transformers serve --continuous-batching": (
                ["transformers", "serve", str(hf_dir), "--continuous-batching", "--device", "cpu", "--dtype",
                 "float32"], str(hf_dir), mix),
        }
        procs, urls = {}, {}
        try:
            for name, (command, _, _) in servers.items():  # all up at once; an idle server takes no CPU
                procs[name], urls[name] = start(command, env)
            for name, (_, model, requests) in servers.items():  # warm-up
                timed_mix(urls[name], model, [{**r, "max_tokens": 4} for r in requests[:args.concurrency]],
                          args.concurrency)
            # rounds, each server in turn (rotated), so a change in the machine's load falls on all of them
            totals = {name: [0.0, [], 0, []] for name in servers}
            size = len(mix) // args.rounds
            for k in range(args.rounds):
                names = list(servers)[k % len(servers):] + list(servers)[:k % len(servers)]
                for name in names:
                    _, model, requests = servers[name]
                    wall, latencies, tokens, answers = timed_mix(urls[name], model,
                                                                 requests[k * size:(k + 1) * size], args.concurrency)
                    totals[name][0] += wall
                    totals[name][1] += latencies
                    totals[name][2] += tokens
                    totals[name][3] += answers
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=60)
    results = {name: summary(*t) for name, t in totals.items()}
    greedy = [i for i, r in enumerate(mix[:size * args.rounds]) if r["temperature"] == 0]
    answers = [t[3] for t in totals.values()]
    same = {"ours batched == one at a time": sum(answers[0][i] == answers[1][i] for i in greedy),
            "ours batched == HF": sum(answers[0][i] == answers[2][i] for i in greedy)}

    ours, alone, hf = results.values()
    print(f"\n{args.requests} completions, {args.concurrency} concurrent, max_tokens 16..64, half greedy, "
          f"half sampled; CPU, {args.threads} threads per server; llama-tiny (same weights both sides)\n")
    print("| server | requests/s | tokens/s | p50 latency | p99 latency |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['p50_s'] * 1e3:.0f} ms | "
              f"{r['p99_s'] * 1e3:.0f} ms |")
    print(f"| ours / HF | {ours['requests_per_s'] / hf['requests_per_s']:.2f}x | "
          f"{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x | {hf['p50_s'] / ours['p50_s']:.2f}x faster | "
          f"{hf['p99_s'] / ours['p99_s']:.2f}x faster |")
    print(f"| ours batched / one at a time | {ours['requests_per_s'] / alone['requests_per_s']:.2f}x | "
          f"{ours['tokens_per_s'] / alone['tokens_per_s']:.2f}x | {alone['p50_s'] / ours['p50_s']:.2f}x faster | "
          f"{alone['p99_s'] / ours['p99_s']:.2f}x faster |")
    print(f"\ngreedy answers equal, of {len(greedy)}: " + ", ".join(f"{k}: {v}" for k, v in same.items()))
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results, "greedy_equal": same,
                                          "greedy": len(greedy)}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
