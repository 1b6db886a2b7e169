"""Loading at real size: peak memory and time of `pm.from_pretrained` against HF's `from_pretrained` on the same
PaliGemma-3B-shaped checkpoint directory (random weights), then the first answer (4 greedy tokens after a
224x224 image) on both sides, the tokens checked equal; the round trip `polymodal convert` HF -> polymodal
-> HF; and the 8.5B Gemma-7B preset loading and generating in bfloat16.

Each measured side runs in its own fresh process (peak RSS from `getrusage(RUSAGE_SELF).ru_maxrss`, which
counts the mapped file pages a process touched: HF maps the file and reads tensors when first used, so
"load + first answer" is the figure to compare). The checkpoints are written shard by shard with random
bfloat16 weights, so writing them never holds the model in memory. Each big run needs up to ~18 GB:

    flock /tmp/bigmem.lock python benchmarks/bench_load.py --dir /work/bench-load

`--tiny` runs the same on a tiny PaliGemma in seconds (the test suite's check of this script).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import polymodal as pm  # noqa: E402
from polymodal.families.paligemma.convert import PALIGEMMA  # noqa: E402
from polymodal.presets import get_preset  # noqa: E402
from polymodal.weights import INDEX, Weights, plan_shards, shard_name, write_file, write_index  # noqa: E402

IMAGE_TOKEN = 257152
SHARD = "2GB"
NEW_TOKENS = 4


def hf_paligemma_config(tiny: bool):
    import transformers

    if tiny:
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      image_size=224, patch_size=14)
        text = dict(vocab_size=257216, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    else:  # PaliGemma 3B at 224px: SigLIP So400m/14 + Gemma 2B (HF's defaults are these sizes)
        vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      image_size=224, patch_size=14, projection_dim=2048)
        text = dict(vocab_size=257216, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                    num_attention_heads=8, num_key_value_heads=1, head_dim=256)
    text.update(pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return transformers.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                        projection_dim=text["hidden_size"])


def random_tensor(name: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """N(0, 0.02), LayerNorm scales 1 (SigLIP's; Gemma's RMSNorm holds an offset from 1, so ~0 is fine)."""
    if "vision" in name and "norm" in name and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0, 0.02)  # straight in bfloat16: no float32 temporary


def write_random(directory: Path, shapes: dict[str, tuple[int, ...]], dtype=torch.bfloat16) -> int:
    """Random weights in HF's sharded layout, one shard in memory at a time; returns their bytes."""
    sizes = {k: torch.Size(s).numel() * dtype.itemsize for k, s in shapes.items()}
    shards = plan_shards(sizes, SHARD)
    for i, names in enumerate(shards):
        tensors = {k: random_tensor(k, shapes[k], dtype) for k in names}
        write_file(directory / shard_name(i, len(shards)), tensors, {"format": "pt"})
        del tensors
    write_index(directory, shards, sum(sizes.values()))
    return sum(sizes.values())


def make_paligemma(directory: Path, tiny: bool) -> int:
    import transformers

    cfg = hf_paligemma_config(tiny)
    with torch.device("meta"):
        model = transformers.PaliGemmaForConditionalGeneration(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied head
    directory.mkdir(parents=True)
    cfg.to_json_file(directory / "config.json")
    return write_random(directory, shapes)


def stored_bytes(directory: Path) -> int:
    """The bytes of a checkpoint's tensors, from its headers."""
    weights = Weights(directory)
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in map(weights.info, weights.keys()))


def make_polymodal(directory: Path, preset: str) -> int:
    config = get_preset(preset)
    with torch.device("meta"):
        model = pm.build(config)
    directory.mkdir(parents=True)
    config.to_json(directory / "config.json")
    return write_random(directory, {k: tuple(v.shape) for k, v in model.state_dict().items()})


def prompt(paligemma: bool, dtype: torch.dtype):
    """A 224x224 image and a prompt (PaliGemma: 256 image tokens, bos, 8 text tokens, newline)."""
    g = torch.Generator().manual_seed(0)
    text = [2] + torch.randint(1000, 200000, (8,), generator=g).tolist() + [108]
    ids = torch.tensor([[IMAGE_TOKEN] * 256 * paligemma + text])
    pixels = torch.rand(1, 3, 224, 224, generator=g, dtype=torch.float32).mul(2).sub(1).to(dtype)
    return ids, pixels


def run_side(side: str, directory: str, dtype_name: str) -> dict:
    """One side, in this (fresh) process: load, then the first answer. Prints its figures as JSON."""
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    config = json.loads((Path(directory) / "config.json").read_text())
    paligemma = config.get("model_type") == "paligemma"
    # the same stop token on both sides: the last id, which the random model practically never chooses
    stop = config.get("text_config", config)["vocab_size"] - 1
    if side == "hf":
        import transformers  # imported before the clock starts, as polymodal is
    start, cpu = time.perf_counter(), time.process_time()
    if side == "hf":
        model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(directory, dtype=dtype).eval()
    else:
        model = pm.from_pretrained(directory, dtype=dtype)
    loaded = time.perf_counter() - start
    ids, pixels = prompt(paligemma, dtype)
    inputs = {"pixel_values": pixels} if paligemma else {}
    with torch.no_grad():
        if side == "hf":
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=stop, pad_token_id=0, **inputs)[:, ids.shape[1]:]
        else:
            out = pm.generate(model, ids, torch.ones_like(ids), max_new_tokens=NEW_TOKENS, eos_token_id=stop, **inputs)
    return {"side": side, "dtype": dtype_name, "load_s": loaded, "total_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu, "peak_rss_gb": peak_rss_gb(), "tokens": out[0].tolist()}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def child(*args: str) -> dict:
    """Runs this script's hidden `_side` / `_convert` mode in a fresh process; its last line is its JSON."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_convert(source: str, target: str, to: str) -> dict:
    from polymodal.cli import main

    start = time.perf_counter()
    extra = ["--model-type", "paligemma"] if to == "hf" else []
    if main(["convert", source, target, "--to", to, "--max-shard-size", SHARD, *extra]) != 0:
        raise SystemExit(f"convert {source} -> {target} failed")
    return {"to": to, "wall_s": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb()}


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of two HF PaliGemma directories equal (keys in either of HF's layouts), one at a time."""
    wa, wb = Weights(a), Weights(b)
    ka, kb = ({PALIGEMMA.canonical(k): k for k in w.keys()} for w in (wa, wb))
    return sorted(ka) == sorted(kb) and all(torch.equal(wa.read(ka[k]), wb.read(kb[k])) for k in ka)


def load_rows(directory: Path, dtypes: list[str], repeats: int) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for r in range(repeats):  # the sides take turns, and swap who goes first
            for side in (("hf", "pm") if r % 2 == 0 else ("pm", "hf")):
                rows.append(child("_side", side, str(directory), dtype))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, required=True,
                   help="where the benchmark writes its checkpoints (removed after, unless --keep)")
    p.add_argument("--keep", action="store_true",
                   help="keep the 3B checkpoint in --dir, and reuse the one a --keep run left there")
    p.add_argument("--tiny", action="store_true", help="a tiny PaliGemma: checks the script in seconds")
    p.add_argument("--repeats", type=int, default=1, help="runs of each side per dtype (default: %(default)s)")
    p.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"], default=["bfloat16", "float32"],
                   help="the dtypes to load in (default: both)")
    p.add_argument("--loads-only", action="store_true", help="only the loads: no convert round trip, no Gemma-7B")
    p.add_argument("--no-gemma-7b", action="store_true", help="skip the 8.5B Gemma-7B run (17 GB on disk)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    source = args.dir / "paligemma-hf"
    reuse = args.keep and (source / INDEX).is_file()
    if args.dir.exists() and not reuse:
        raise SystemExit(f"{args.dir} exists and holds no checkpoint a --keep run left: give a new directory")
    results: dict = {}
    try:
        results["checkpoint_gb"] = (stored_bytes(source) if reuse else make_paligemma(source, args.tiny)) / 1e9
        results["loads"] = load_rows(source, args.dtypes, args.repeats)
        if not args.loads_only:
            convert_rows(args, source, results)
    finally:
        for path in ([args.dir / "paligemma-pm", args.dir / "paligemma-back", args.dir / "gemma-7b"] if args.keep
                     else [args.dir]):
            shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    for dtype in args.dtypes:
        tokens = {tuple(r["tokens"]) for r in results["loads"] if r["dtype"] == dtype}
        if len(tokens) != 1:
            raise SystemExit(f"{dtype}: the sides' greedy tokens differ: {tokens}")
    if not results.get("round_trip_equal", True):
        raise SystemExit("HF -> polymodal -> HF changed a tensor")


def convert_rows(args, source: Path, results: dict) -> None:
    """The round trip HF -> polymodal -> HF, then the 8.5B Gemma-7B load."""
    results["convert"] = [child("_convert", str(source), str(args.dir / "paligemma-pm"), "polymodal"),
                          child("_convert", str(args.dir / "paligemma-pm"), str(args.dir / "paligemma-back"), "hf")]
    results["round_trip_equal"] = same_tensors(source, args.dir / "paligemma-back")
    print(json.dumps(results["convert"]), results["round_trip_equal"], flush=True)
    shutil.rmtree(args.dir / "paligemma-pm")
    shutil.rmtree(args.dir / "paligemma-back")
    if not args.no_gemma_7b and not args.tiny:
        gemma = args.dir / "gemma-7b"
        results["gemma_7b_checkpoint_gb"] = make_polymodal(gemma, "gemma-7b") / 1e9
        results["gemma_7b"] = child("_side", "pm", str(gemma), "bfloat16")
        print(json.dumps(results["gemma_7b"]), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_side":
        print(json.dumps(run_side(*sys.argv[2:5])))
    elif len(sys.argv) > 1 and sys.argv[1] == "_convert":
        print(json.dumps(run_convert(*sys.argv[2:5])))
    else:
        main()
