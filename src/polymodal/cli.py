"""The `polymodal` command: train | generate | eval | convert | export-data.

`polymodal train` with no arguments is the main job: a tiny PaliGemma trained on the built-in
world, written to runs/paligemma-world; `polymodal eval` then scores it on held-out questions.
The train flags are generated from `TrainConfig`'s fields (help from their comments), so the CLI
and the config cannot drift apart; tests/test_cli_surface.py freezes the whole surface.
A user mistake (a missing file, a bad document line, an unknown option) ends with one line on
stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import shutil
import sys
import types
import typing
from pathlib import Path

from polymodal.config import ConfigError
from polymodal.data.documents import DocumentError
from polymodal.data.synthetic import COT_TASKS
from polymodal.errors import PolymodalError
from polymodal.train.trainer import IMAGE_TASKS, WORLD, TrainConfig, TrainingError
from polymodal.weights import SHARDED

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "polymodal_tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def _field_help(cls: type) -> dict[str, str]:
    """Each dataclass field's trailing `# comment` in the source, as its help text."""
    source = inspect.getsource(cls)
    return {name: text.strip() for name, text in re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]+#(.*)$", source, re.M)}


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field: --max-steps N, --pack/--no-pack, --tasks a b c."""
    hints, helps = typing.get_type_hints(cls), _field_help(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        kwargs: dict = {"default": argparse.SUPPRESS,  # only flags given override the defaults
                        "help": f"{helps.get(f.name, '')} (default: {f.default!r})".lstrip()}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is tuple:
            kwargs.update(nargs="+", type=typing.get_args(base)[0])
        else:
            kwargs["type"] = base
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polymodal", description="Multimodal language models from one set of blocks.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (no arguments: the main job on the built-in world)")
    add_config_flags(t, TrainConfig)

    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("checkpoint", help="a checkpoint or model directory (or a run directory: its last checkpoint)")
    g.add_argument("--prompt", required=True, help="the text prompt")
    g.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    g.add_argument("--audio", action="append", default=[], help="a 16-bit mono wav file (repeat for several)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--assistant", default=None, metavar="DRAFT_DIR",
                   help="speculative decoding with this draft model (same vocabulary) checking k tokens at a time")
    g.add_argument("--num-assistant-tokens", type=int, default=None, metavar="K",
                   help="tokens the draft proposes per step (default: 5)")
    g.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="speculative decoding with N-token drafts looked up in the prompt (no draft model)")
    g.add_argument("--image-dir", default="images", help="where images the model draws go, as PNG files "
                                                          "(default: %(default)s)")
    g.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantized decoder linear layers")

    e = sub.add_parser("eval", help="accuracy per task on the built-in world's held-out split")
    e.add_argument("checkpoint", nargs="?", default=str(TrainConfig().run_dir),
                   help="a run directory (its last checkpoint) or a checkpoint directory (default: %(default)s)")
    e.add_argument("--n", type=int, default=200, help="held-out examples per task (default: %(default)s)")
    e.add_argument("--tasks", nargs="+", default=None, help="tasks to score (default: those the run trained on)")
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantized decoder linear layers")
    e.add_argument("--cot-k", type=int, default=8, help="chains of thought sampled per question of a task asked with "
                                                       "one (compare_cot), for majority and routing (default: %(default)s)")
    e.add_argument("--cot-validation", type=int, default=100, help="validation questions the routing threshold is "
                                                                  "chosen on (default: %(default)s)")

    c = sub.add_parser("convert", help="convert between Hugging Face and polymodal checkpoint directories (and a "
                                       "sharded training checkpoint to a plain one)")
    c.add_argument("source")
    c.add_argument("target")
    c.add_argument("--to", required=True, choices=("hf", "polymodal"))
    c.add_argument("--model-type", help="the HF model_type to write (with --to hf), e.g. llama, gemma")
    c.add_argument("--max-shard-size", default="50GB", help="above this size the weights are written as HF's "
                                                            "shards + index, e.g. 5GB (default: %(default)s)")

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server and a chat page (pip install polymodal[serve])")
    s.add_argument("checkpoint", help="a checkpoint or model directory (or a run directory: its last checkpoint)")
    s.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    s.add_argument("--slots", type=int, default=8, help="requests decoded together (default: %(default)s)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before the server answers "
                                                             "429 (default: %(default)s)")

    x = sub.add_parser("export-data", help="write built-in world examples as a JSONL document file")
    x.add_argument("output", help="the .jsonl file to write (media go to <name>_media/ beside it)")
    x.add_argument("--n", type=int, default=100, help="number of documents (default: %(default)s)")
    x.add_argument("--split", choices=("train", "eval"), default="train")
    x.add_argument("--tasks", nargs="+", default=None, help=f"world tasks (default: all: {' '.join(WORLD.tasks)})")
    return p


def _checkpoint_dir(path: str) -> Path:
    """A model directory itself, or the last checkpoint of a run directory."""
    from polymodal.train.checkpoint import latest_checkpoint

    p = Path(path)
    if (p / "config.json").is_file():
        return p
    last = latest_checkpoint(p / "checkpoints")
    if last is None:
        raise FileNotFoundError(f"{p} is neither a model directory (no config.json) nor a run directory with "
                                "checkpoints; train one with `polymodal train`")
    return last


def _load(path: str, quantize: str | None = None):
    import polymodal as pm
    from polymodal.data.tokenizer import Tokenizer

    directory = _checkpoint_dir(path)
    return directory, pm.from_pretrained(directory, quantize=quantize), Tokenizer.from_file(directory)


def cmd_train(args: argparse.Namespace) -> None:
    from polymodal.train.checkpoint import list_checkpoints, read_trainer_state
    from polymodal.train.trainer import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}  # only the flags on the command line
    if given.get("resume"):  # continue the run as it was set up; flags given now override its settings
        for last in reversed(list_checkpoints(TrainConfig.from_dict(given).run_dir / "checkpoints")):
            try:  # the newest readable one; the trainer says which checkpoints it skips
                given = {**read_trainer_state(last)["train_config"], **given}
                break
            except (PolymodalError, KeyError, OSError):
                continue
    train(TrainConfig.from_dict(given))


def cmd_generate(args: argparse.Namespace) -> None:
    from polymodal.data.collators import make_collator
    from polymodal.data.documents import Document, Segment, load_media
    from polymodal.generation.engine import generate

    segments = []
    for flag, kind, paths in (("--image", "image", args.image), ("--audio", "audio", args.audio)):
        for path in paths:
            try:
                segments.append(Segment(kind, media=load_media(path, kind)))
            except ValueError as e:
                raise ValueError(f"{flag}: {e}") from e
    directory, model, tokenizer = _load(args.checkpoint, args.quantize)
    draft = _load(args.assistant)[1] if args.assistant is not None else None
    if not hasattr(model, "make_cache"):
        raise ValueError(f"{directory} holds a {type(model).__name__}, which embeds images and texts but writes "
                         "nothing; score it with `polymodal eval`")
    collator = make_collator(model.config, tokenizer)
    prompt = collator.format.encode(Document([*segments, Segment("text", args.prompt)]), prompt_only=True)
    context = collator.format.max_len
    if len(prompt) + args.max_new_tokens > context:
        media = " (media placeholders included)" if segments else ""
        raise ValueError(f"the prompt is {len(prompt)} tokens{media} and --max-new-tokens is {args.max_new_tokens}: "
                         f"{len(prompt) + args.max_new_tokens} in all, past the model's context of {context} tokens "
                         f"({directory})")
    batch = collator.pad([prompt])
    del batch["labels"]
    draws = getattr(model, "image_spans", None) is not None  # a model that writes images (Chameleon)
    if draws and Path(args.image_dir).exists() and not Path(args.image_dir).is_dir():
        raise NotADirectoryError(f"--image-dir expects a directory for the images drawn, got the file {args.image_dir}")
    new = generate(model, **batch, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, return_images=draws,
                   assistant_model=draft, num_assistant_tokens=args.num_assistant_tokens,
                   prompt_lookup_num_tokens=args.prompt_lookup)
    if draws:
        new, [images] = new
        for i, image in enumerate(images):
            Path(args.image_dir).mkdir(parents=True, exist_ok=True)
            image.save(Path(args.image_dir) / f"image_{i}.png")
            print(f"wrote {Path(args.image_dir) / f'image_{i}.png'}")
    text = new[0][new[0] < tokenizer.vocab_size]  # image codes, and a vocabulary padded past the tokenizer's
    print(tokenizer.decode(text.tolist()).strip())


def cmd_eval(args: argparse.Namespace) -> None:
    from polymodal.evaluate import table
    from polymodal.retrieval import score_retrieval, scorer
    from polymodal.evaluate_cot import VALIDATION_START

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.cot_k < 1 or args.cot_validation < 1:
        raise ValueError(f"--cot-k and --cot-validation must be >= 1, got {args.cot_k} and {args.cot_validation}")
    if args.n > VALIDATION_START and any(t in COT_TASKS for t in args.tasks or ()):
        raise ValueError(f"--n must be <= {VALIDATION_START} for chain-of-thought tasks (their validation questions "
                         f"start at eval example {VALIDATION_START}), got {args.n}")
    directory, model, tokenizer = _load(args.checkpoint, args.quantize)
    tasks = args.tasks
    if tasks is None:
        trainer_state = directory / "trainer.json"
        tasks = (json.loads(trainer_state.read_text())["train_config"]["tasks"] if trainer_state.is_file()
                 else IMAGE_TASKS)
    for task in tasks:
        WORLD.choices(task)  # an unknown task fails here, before any work
    plain = tuple(t for t in tasks if t not in COT_TASKS)
    if plain:
        score = scorer(model)
        how = "image -> answer retrieval" if score is score_retrieval else "greedy answers"
        print(f"{directory}: {how} on the built-in world's held-out split")
        print(table(score(model, tokenizer, plain, args.n, WORLD, args.batch_size)))
    cot = [t for t in tasks if t in COT_TASKS]
    if cot:
        eval_routing(args, directory, model, tokenizer, cot)


def eval_routing(args: argparse.Namespace, directory: Path, model, tokenizer, tasks: list[str]) -> None:
    """`polymodal eval`'s table for tasks asked with a chain of thought: greedy, CoT and routed side by side."""
    from polymodal.evaluate_cot import evaluate_routing, routing_table

    print(f"{directory}: direct and chain-of-thought answers on the built-in world's held-out split")
    print(routing_table([evaluate_routing(model, tokenizer, t, args.n, WORLD, k=args.cot_k,
                                          validation=args.cot_validation, batch_size=args.batch_size)
                         for t in tasks]))


def cmd_convert(args: argparse.Namespace) -> None:
    import polymodal as pm
    from polymodal.convert.hf import FAMILIES, load_hf, save_hf

    source, target = Path(args.source), Path(args.target)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json: not a checkpoint directory")
    if target.resolve() == source.resolve():
        raise ValueError(f"convert writes a new directory: the target {target} is the source itself, whose "
                         "config.json and weights it would replace; give another target")
    if args.to == "hf":
        if args.model_type not in FAMILIES:
            raise ValueError(f"--to hf needs --model-type, one of {sorted(FAMILIES)}; got {args.model_type!r}")
        save_hf(pm.from_pretrained(source, dtype="auto"), target, args.model_type, args.max_shard_size)
    else:
        if (source / SHARDED).is_dir():  # a training checkpoint that FSDP processes wrote sharded: one plain folder
            model = pm.from_pretrained(source)
        elif "config_class" in json.loads((source / "config.json").read_text()):
            raise ValueError(f"{source} is already a polymodal checkpoint directory; --to polymodal reads an HF one "
                             "(or a sharded training checkpoint)")
        else:
            model = load_hf(source, dtype="auto")
        pm.save_pretrained(model, target, max_shard_size=args.max_shard_size)
    for name in TOKENIZER_FILES:  # so that generate/eval find the tokenizer beside the weights
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    print(f"wrote {target}")


def cmd_export_data(args: argparse.Namespace) -> None:
    from polymodal.data.synthetic import export_jsonl

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    export_jsonl(WORLD, args.output, args.split, args.n, args.tasks)
    print(f"wrote {args.n} documents to {args.output}")


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from polymodal.serve.app import serve
    except ImportError as e:
        raise ValueError(f"serving needs FastAPI and uvicorn: pip install 'polymodal[serve]' ({e})") from e

    if args.slots < 1 or args.max_queue < 0:
        raise ValueError(f"--slots must be >= 1 and --max-queue >= 0, got {args.slots} and {args.max_queue}")
    serve(_checkpoint_dir(args.checkpoint), name=Path(args.checkpoint).resolve().name, host=args.host, port=args.port,
          slots=args.slots, max_queue=args.max_queue)


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "convert": cmd_convert,
            "export-data": cmd_export_data, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (PolymodalError, DocumentError, ConfigError, TrainingError, FileNotFoundError, FileExistsError,
            NotADirectoryError, IsADirectoryError, PermissionError, ValueError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"polymodal {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: training saved a checkpoint and says where
        print(f"polymodal {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
