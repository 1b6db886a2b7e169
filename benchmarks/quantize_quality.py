"""What weight-only quantization costs a trained model: held-out accuracy on the built-in world, max logit
drift vs float32 on the held-out prompts, and the bytes its weights hold, for float32, int8 and int4.

    python benchmarks/quantize_quality.py runs/paligemma-world --n 200
"""

from __future__ import annotations

import argparse

import torch

import polymodal as pm
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.evaluate import evaluate
from polymodal.families.collators import make_collator
from polymodal.nn.quantize import model_bytes
from polymodal.train.checkpoint import latest_checkpoint
from timing import save_results  # benchmarks/timing.py, beside this script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (its last checkpoint) or a checkpoint directory")
    p.add_argument("--tasks", nargs="+", default=["caption", "colour", "shape", "count", "position"])
    p.add_argument("--n", type=int, default=200, help="held-out examples per task")
    p.add_argument("--out", default="benchmarks/results/quantize_quality.json")
    args = p.parse_args()
    directory = latest_checkpoint(f"{args.run}/checkpoints") or args.run
    world, tokenizer = World(seed=0), Tokenizer.from_file(directory)
    models = {mode: pm.from_pretrained(directory, quantize=mode) for mode in (None, "int8", "int4")}
    docs = [world.sample(task, i, "eval").document for task in args.tasks for i in range(16)]
    batch = make_collator(models[None].config, tokenizer).prompts(docs)
    with torch.no_grad():
        logits = {mode: m(**batch).logits for mode, m in models.items()}
    mask = batch["attention_mask"].bool()
    rows = []
    for mode, model in models.items():
        scores = evaluate(model, tokenizer, tuple(args.tasks), args.n, world, batch_size=100)
        rows.append({"weights": mode or "float32", "decoder_bytes": model_bytes(model.decoder),
                     "max_logit_drift": float((logits[mode] - logits[None])[mask].abs().max()),
                     "accuracy": {s.task: s.accuracy for s in scores}})
    print(f"{directory}: held-out split, {args.n} per task; logit drift over {len(docs)} held-out prompts "
          f"(largest float32 logit {float(logits[None][mask].abs().max()):.1f})")
    print(f"| weights | decoder MB | max logit drift | {' | '.join(args.tasks)} |")
    print("|---" * (3 + len(args.tasks)) + "|")
    for r in rows:
        accuracy = " | ".join(f"{r['accuracy'][t]:.1%}" for t in args.tasks)
        print(f"| {r['weights']} | {r['decoder_bytes'] / 1e6:.2f} | {r['max_logit_drift']:.4f} | {accuracy} |")
    save_results({"checkpoint": str(directory), "n": args.n, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
