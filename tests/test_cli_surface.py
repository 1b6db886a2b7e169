"""Freezes the command-line surface (torchtitan's test_no_new_cli_options): adding, renaming or removing a
subcommand or flag must change this list on purpose. Train flags come from TrainConfig's fields."""

import argparse
import dataclasses

from polymodal.cli import parser
from polymodal.train.trainer import TrainConfig

SURFACE = [
    "convert --max-shard-size", "convert --model-type", "convert --to", "convert <source>", "convert <target>",
    "eval --batch-size", "eval --cot-k", "eval --cot-validation", "eval --dtype", "eval --n", "eval --quantize", "eval --tasks", "eval <checkpoint>",
    "eval --data", "eval --do-sample", "eval --max-new-tokens", "eval --metric", "eval --out", "eval --overwrite",
    "eval --seed", "eval --temperature", "eval --top-k", "eval --top-p",
    "export-data --n", "export-data --split", "export-data --tasks", "export-data <output>",
    "generate --assistant", "generate --audio", "generate --do-sample", "generate --dtype", "generate --draw", "generate --image",
    "generate --image-dir", "generate --mask-vae",
    "generate --max-new-tokens", "generate --num-assistant-tokens", "generate --prompt", "generate --prompt-lookup",
    "generate --quantize", "generate --seed", "generate --temperature",
    "generate --top-k", "generate --top-p", "generate <checkpoint>",
    "plot --out", "plot <run>",
    "serve --compile", "serve --dtype",
    "serve --host", "serve --mask-vae", "serve --max-body-mb", "serve --max-queue", "serve --port", "serve --slots", "serve <checkpoint>",
    "train --activation-checkpointing", "train --attention", "train --batch-size", "train --beta1", "train --beta2",
    "train --checkpoint-every", "train --compile", "train --context-parallel", "train --data", "train --device", "train --eval-data", "train --eval-docs",
    "train --early-stop", "train --eval-every", "train --grad-accum", "train --grad-clip", "train --init-from", "train --keep-best", "train --keep-checkpoints",
    "train --log-every", "train --lora-alpha", "train --lora-dropout", "train --lora-rank", "train --lora-targets", "train --lora-tokens",
    "train --lr", "train --mask-vae", "train --max-len", "train --max-steps", "train --min-lr", "train --model",
    "train --name", "train --no-activation-checkpointing", "train --no-compile", "train --no-pack", "train --no-resume",
    "train --out-dir", "train --pack", "train --parallel", "train --resume", "train --seed", "train --tasks",
    "train --tokenizer", "train --vocab-size", "train --warmup-steps", "train --weight-decay",
    "train --strict-paths", "train --no-strict-paths", "train --trainable", "train --vq-steps",
]


def surface(p: argparse.ArgumentParser) -> list[str]:
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, command in sub.choices.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                out += [f"{name} {o}" for o in action.option_strings] or [f"{name} <{action.dest}>"]
    return sorted(out)


def test_cli_surface_is_frozen():
    assert surface(parser()) == sorted(SURFACE)


def test_every_train_config_field_is_a_flag():
    flags = {s.split()[1] for s in SURFACE if s.startswith("train --")}
    assert {"--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)} <= flags
