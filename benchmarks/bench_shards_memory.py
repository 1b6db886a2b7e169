"""Memory and time of reading WebDataset tar shards lazily (`polymodal.data.shards.TarShards`).

Writes --docs image-caption samples (--image-size square PNGs of noise made with Pillow, a caption
each) into shards of --per-shard samples with WebDataset's own ShardWriter, then, in a fresh process so
that writing leaves nothing behind: opens the set by its brace pattern (indexes the tar headers), streams every caption (what the tokenizer
trains on), and reads every document, images decoded, in the trainer's order (a seeded permutation of
the whole set), sampling the process's resident memory (VmRSS) every 1% of the documents. Reports RSS
after imports, after indexing, and its rise over the read (from the first 1% to the end, and the peak),
with CPU seconds of each phase (process time, steadier than wall time on a loaded machine).

    python benchmarks/bench_shards_memory.py                          # 100,000 documents in 100 shards
    python benchmarks/bench_shards_memory.py --docs 4000 --per-shard 500 --out rss.json
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def write_shard_set(folder: Path, docs: int, per_shard: int, size: int) -> str:
    """Shards train-000000.tar, ... in folder; returns their brace pattern."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(docs):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(png, format="PNG")
            sink.write({"__key__": f"{i:08d}", "png": png.getvalue(),
                        "txt": f"a {COLOURS[i % len(COLOURS)]} patch, sample {i}"})
    last = (docs - 1) // per_shard
    return str(folder / f"train-{{{0:06d}..{last:06d}}}.tar")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def measure(pattern: str, size: int) -> dict:
    """Run in a fresh process: the figures of opening, streaming texts and reading every document."""
    import numpy as np

    from polymodal.data.lazy import document_texts
    from polymodal.data.shards import TarShards

    out = {"rss_after_imports_mb": rss_mb()}
    t = time.process_time()
    docs = TarShards(pattern)
    out.update(docs=len(docs), index_cpu_s=time.process_time() - t, rss_after_index_mb=rss_mb())
    t = time.process_time()
    out["caption_chars"] = sum(len(text) for text in document_texts(docs))
    out["texts_cpu_s"] = time.process_time() - t
    order = np.random.default_rng([0, 0]).permutation(len(docs))  # the trainer's first epoch
    every = max(1, len(docs) // 100)
    samples, pixels, t = [], 0, time.process_time()
    for n, i in enumerate(order, 1):
        pixels += docs[i].images[0].size[0]
        if n % every == 0:
            samples.append(rss_mb())
    out.update(read_cpu_s=time.process_time() - t, read_us_per_doc=(time.process_time() - t) / len(docs) * 1e6,
               rss_samples_mb=samples, rss_first_percent_mb=samples[0], rss_end_mb=samples[-1],
               rss_peak_mb=max(samples), rss_rise_over_read_mb=samples[-1] - samples[0])
    assert pixels == size * len(docs)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--dir", help="where to write the shards (default: a temporary folder, removed after)")
    p.add_argument("--out", help="write the figures here as JSON")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: the pattern to measure
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.image_size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp)
        t = time.time()
        pattern = write_shard_set(folder, args.docs, args.per_shard, args.image_size)
        written = time.time() - t
        child = subprocess.run([sys.executable, __file__, "--measure", pattern, "--image-size", str(args.image_size)],
                               capture_output=True, text=True, check=True)
        figures = {"per_shard": args.per_shard, "image_size": args.image_size, "write_wall_s": written,
                   "shard_bytes": sum(f.stat().st_size for f in folder.glob("*.tar")),
                   **json.loads(child.stdout.splitlines()[-1])}
    print(f"{figures['docs']:,} documents in {figures['docs'] // args.per_shard} shards "
          f"({figures['shard_bytes'] / 2**20:.0f} MB)")
    print(f"RSS after imports {figures['rss_after_imports_mb']:.0f} MB, after indexing "
          f"{figures['rss_after_index_mb']:.0f} MB ({figures['index_cpu_s']:.1f} s CPU)")
    print(f"captions streamed in {figures['texts_cpu_s']:.1f} s CPU")
    print(f"read all in shuffled order: {figures['read_us_per_doc']:.0f} us CPU/doc; RSS at 1% "
          f"{figures['rss_first_percent_mb']:.0f} MB, at the end {figures['rss_end_mb']:.0f} MB, peak "
          f"{figures['rss_peak_mb']:.0f} MB (rise over the read {figures['rss_rise_over_read_mb']:+.1f} MB)")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
