"""The batcher in-process (no HTTP): the paged, prefix-cached batcher against the static-slot one it replaced.

A tiny Gemini that reads images (gemini-tiny with a BPE trained on the built-in world's texts, random weights)
gets a mixed text + image workload laid out by the server's own prompt builder: `--requests` requests, one in
four text only, the others one of `--images` world images followed by one of two questions about it (so
requests share images, and an image with its question); max_tokens 8..24, half greedy, half sampled
(temperature 0.8, seeded). At each concurrency (a closed loop: a new request is submitted as soon as one
finishes, `concurrency` in flight, `slots` = concurrency) both batchers serve the same requests, taking turns.

Rows: generated tokens per CPU second, TTFT and TPOT (mean time per output token after the first) p50/p99,
in CPU milliseconds of this process (one thread does all the work, torch on one thread: CPU time is not
inflated by the other jobs of a loaded machine); peak KV cache bytes per concurrent request, from the bytes
the caches' tensors really allocated (paged: the blocks held at a step, at the pool's allocated bytes per
block, over the requests running then, the highest over the run; static: its whole-context cache over its
slots); the prefix-cache hit rate (prompt tokens found cached over prompt tokens looked up),
beside the rate the workload predicts (each request's longest prefix shared with an earlier request, in
whole blocks that cover its media and leave its last token, with no eviction and each prompt cached as soon
as it is admitted). Every answer of the two batchers is compared.

    python benchmarks/bench_batcher.py            # the README's table
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import polymodal as pm
from polymodal.data.documents import Document, Segment
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.generation.batching import Batcher, Request
from polymodal.generation.prompt_keys import prompt_keys
from polymodal.generation.prompts import prompts
from polymodal.presets import get_preset

BASELINE = "c85ae47"  # the commit whose generation/batching.py is the static-slot batcher replaced here
QUESTIONS = ("what shape is it?", "what colour is the shape?")  # world prompts: known to its tokenizer


def static_batcher_class():
    """The static-slot `Batcher` as it was at BASELINE, imported from its source."""
    source = subprocess.run(["git", "show", f"{BASELINE}:src/polymodal/generation/batching.py"], check=True,
                            capture_output=True, text=True, cwd=Path(__file__).parent).stdout
    path = Path(tempfile.mkdtemp()) / "static_batching.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("static_batching", path)
    module = sys.modules["static_batching"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Batcher, module.Request


def world_reader() -> tuple:
    """gemini-tiny that reads images and writes text (no drawing head), random weights (seed 0), and a BPE
    trained on the built-in world's texts."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(World(seed=0).texts(), vocab_size=320)
    reader = get_preset("gemini-tiny")
    reader = reader.replace(vq=None, tokens=reader.tokens.replace(draw=None))
    return pm.build(fit_to_tokenizer(reader, tokenizer)).eval(), tokenizer


def world_images(n: int) -> list:
    """The images of the world's first n shape questions."""
    return [World(seed=0).sample("shape", i).document.images[0] for i in range(n)]


def allocated_bytes(cache) -> int:
    """Bytes of every tensor a cache object holds (through its attributes, lists and dicts), each storage
    counted once: what it really allocated, whatever its layout."""
    storages, objects, todo, total = set(), set(), [cache], 0
    while todo:
        obj = todo.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, (list, tuple)):
            todo += obj
        elif isinstance(obj, dict):
            todo += obj.values()
        elif hasattr(obj, "__dict__") and id(obj) not in objects:
            objects.add(id(obj))
            todo += vars(obj).values()
    return total


def workload(n: int, n_images: int) -> tuple:
    """The model, its context, and `n` requests' (inputs, max_tokens, temperature, seed)."""
    model, tokenizer = world_reader()
    collator = make_collator(model.config, tokenizer)
    images = world_images(n_images)
    rng = random.Random(0)
    mix = []
    for i in range(n):
        question = rng.choice(QUESTIONS)
        segments = [Segment("text", question)]
        if i % 4:
            segments.insert(0, Segment("image", media=rng.choice(images)))
        inputs, wanted = prompts(collator, [Document(segments)], rng.randint(8, 24))
        del inputs["attention_mask"]
        mix.append((inputs, wanted, 0.8 if i % 2 else 0.0, i))
    return model, collator.format.max_len, mix


def predicted_hit_rate(model, mix: list, block_size: int) -> float:
    """Hit tokens over prompt tokens if every earlier prompt were cached: each request's longest run of
    leading blocks equal (ids, per-token inputs, media) to an earlier one's, covering its media and not its
    last token."""
    seen: set[bytes] = set()
    hit = total = 0
    for inputs, *_ in mix:
        keys = prompt_keys(model, inputs)
        blocks = [keys.base((b + 1) * block_size) for b in range((keys.length - 1) // block_size)]
        found = next((b for b, base in enumerate(blocks) if base not in seen), len(blocks))
        if found * block_size >= keys.media_end:
            hit += found * block_size
        total += keys.length
        seen.update(keys.base((b + 1) * block_size) for b in range(keys.length // block_size))
    return hit / total


def serve(batcher, request_class, mix: list, concurrency: int) -> dict:
    """Runs the mix through the batcher, `concurrency` in flight, in this thread; CPU-time figures."""
    clock = time.process_time
    pending, times, answers, held = list(mix), [], [], []
    in_flight = [0]

    def submit(inputs, wanted, temperature, seed):
        t = {"sent": clock()}

        def on_token(token):
            t.setdefault("first", clock())
            t["last"] = clock()
            return True

        def on_finish(request):
            in_flight[0] -= 1

        request = request_class(inputs, max_new_tokens=wanted, temperature=temperature,
                                seed=seed if temperature else None, on_token=on_token, on_finish=on_finish)
        batcher.submit(request)
        in_flight[0] += 1
        times.append(t)
        answers.append(request)

    paged = hasattr(batcher.cache, "pool")
    block_bytes = allocated_bytes(batcher.cache) / batcher.cache.pool.n_blocks if paged else 0
    start = clock()
    while pending or not batcher.idle():
        while pending and in_flight[0] < concurrency:
            submit(*pending.pop(0))
        batcher.step()
        if paged and batcher.running:  # the blocks sequences hold (shared ones once), at their allocated size
            held.append(batcher.cache.pool.in_use * block_bytes / batcher.running)
    cpu = clock() - start
    ttft = sorted(1000 * (t["first"] - t["sent"]) for t in times)
    tpot = sorted(1000 * (t["last"] - t["first"]) / (len(r.tokens) - 1) for t, r in zip(times, answers)
                  if len(r.tokens) > 1)
    tokens = sum(len(r.tokens) for r in answers)
    return {"tokens_per_cpu_s": tokens / cpu, "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
            "tpot_p50_ms": pct(tpot, 0.5), "tpot_p99_ms": pct(tpot, 0.99), "answers": [r.tokens for r in answers],
            "peak_kv_bytes_per_request": max(held) if paged else allocated_bytes(batcher.cache) / batcher.slots}


def pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--out", default="bench_batcher.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, context, mix = workload(args.requests, args.images)
    StaticBatcher, StaticRequest = static_batcher_class()
    predicted = predicted_hit_rate(model, mix, args.block_size)
    rows = []
    for c in args.concurrency:
        paged = Batcher(model, slots=c, max_len=context, block_size=args.block_size)
        ours = serve(paged, Request, mix, c)
        static = StaticBatcher(model, slots=c, max_len=context)
        theirs = serve(static, StaticRequest, mix, c)
        ours["hit_rate"] = paged.cache.hit_tokens / paged.cache.prompt_tokens
        encoder = paged.encoder_caches["pixel_values"]
        ours["images_encoded"], ours["images_from_cache"] = encoder.misses, encoder.hits
        same = ours.pop("answers") == theirs.pop("answers")
        rows.append({"concurrency": c, "paged": ours, "static": theirs, "answers_equal": same})
        print(f"concurrency {c:>3}: answers equal {same}", file=sys.stderr)
    print(f"{args.requests} requests (1 in 4 text only, {args.images} shared images, {len(QUESTIONS)} questions), "
          f"context {context}, block size {args.block_size}; CPU ms of one thread")
    print("| concurrency | batcher | tokens/CPU s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | peak KV KiB per "
          "request | prefix hits (predicted) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for name in ("paged", "static"):
            r = row[name]
            hits = f"{r['hit_rate']:.1%} ({predicted:.1%})" if name == "paged" else "-"
            print(f"| {row['concurrency']} | {name} | {r['tokens_per_cpu_s']:.0f} | {r['ttft_p50_ms']:.1f} / "
                  f"{r['ttft_p99_ms']:.1f} | {r['tpot_p50_ms']:.2f} / {r['tpot_p99_ms']:.2f} | "
                  f"{r['peak_kv_bytes_per_request'] / 1024:.0f} | {hits} |")
    print("answers equal throughout:", all(row["answers_equal"] for row in rows))
    Path(args.out).write_text(json.dumps({"predicted_hit_rate": predicted, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
