"""The `polymodal` command: train | generate | eval | convert | export-data | serve | plot.

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
import io
import json
import re
import shutil
import sys
import types
import typing
from pathlib import Path

from safetensors import SafetensorError

from polymodal.config import ConfigError
from polymodal.data.synthetic import COT_TASKS, WORLD
from polymodal.errors import (CheckpointError, ExistingFileError, InputError, MissingFileError, PathKindError,
                              PolymodalError)
from polymodal.evaluate.metrics import METRICS
from polymodal.train.trainer import IMAGE_TASKS, TrainConfig
from polymodal.serve.protocol import Limits

METRIC_WHAT = {**{name: m.what for name, m in METRICS.items()}, "recall": "image->text R@1",
               "boxes": "box accuracy at IoU 0.5 / 0.75, mean mask IoU"}
METRIC_NAMES = tuple(METRIC_WHAT)
SHOWN_DOCUMENTS = 5  # documents `export-data` prints (media, prompt, answer)
QUANTIZE_HELP = ("weight-only quantized decoder linear layers; on a CPU they save memory and cost time (measured "
                 "by benchmarks/bench_quantize.py, a 64M decoder, 1 thread, shared machine): int8 0.40x float32's "
                 "weight bytes, 1.4x its time per new token; int4 0.35x the bytes, 4.5x the time per new token, ~45x per "
                 "prompt")
DTYPES = ("float32", "bfloat16", "float16", "auto")
DTYPE_HELP = ("the weights' dtype: float32 (the default), bfloat16 or float16 (half the memory; a model loaded in float32 "
              "gives the answers the parity tests check), or auto: the checkpoint's own (as HF's from_pretrained)")
MAX_NEW_TOKENS = 32  # generate's default for text; a drawing model gets one image span more
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
        text = helps.get(f.name, "")  # a help that says its default in words keeps it alone
        kwargs: dict = {"default": argparse.SUPPRESS,  # only flags given override the defaults
                        "help": text if "default" in text else f"{text} (default: {f.default!r})".lstrip()}
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
    _generate_flags(sub)
    _eval_flags(sub)
    _other_commands(sub)
    return p


def _generate_flags(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("checkpoint", help="a checkpoint or model directory (or a run directory: its best checkpoint, "
                                      "else its last)")
    g.add_argument("--prompt", required=True, help="the text prompt")
    g.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    g.add_argument("--audio", action="append", default=[],
                   help="a wav file: PCM or float, any rate and channel count (repeat for several)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"(default: {MAX_NEW_TOKENS}, plus one image span for a model that draws)")
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
    g.add_argument("--quantize", choices=("int8", "int4"), help=QUANTIZE_HELP)
    g.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)
    g.add_argument("--draw", default=None, metavar="OUT.png",
                   help="read the answer's boxes (and masks) as PaliGemma-style location tokens, print each object "
                        "and draw them over the one --image into this new PNG file")
    g.add_argument("--mask-vae", default=None, metavar="VAE.npz",
                   help="the mask VQ-VAE (big_vision's vae-oid.npz) that decodes an answer's segmentation tokens "
                        "(default: the model's own, if it holds one)")


def _eval_flags(sub) -> None:
    e = sub.add_parser("eval", help="accuracy per task on the built-in world's held-out split, or scores on your "
                                    "own documents (--data)")
    e.add_argument("checkpoint", nargs="?", default=str(TrainConfig().run_dir),
                   help="a run directory (its best checkpoint, else its last) or a checkpoint directory "
                        "(default: %(default)s)")
    e.add_argument("--data", default=None, help="your documents, in any format train --data reads: answers to their "
                                                "target segments are scored against their references (default: the "
                                                "built-in world)")
    e.add_argument("--metric", default=None, help=f"with --data: one of {', '.join(METRIC_NAMES)} (default: exact; "
                                                  "boxes when the targets hold objects: box accuracy at IoU 0.5 and "
                                                  "0.75, mean mask IoU, invalid answers; recall for a dual encoder)")
    e.add_argument("--out", default=None, help="with --data: the folder for predictions.jsonl and results.json "
                                               "(default: CHECKPOINT/eval/<data file name>)")
    e.add_argument("--overwrite", action="store_true", help="with --data: replace an earlier evaluation in --out")
    e.add_argument("--max-new-tokens", type=int, default=None, help="with --data: the longest answer (default: the "
                                   "longest reference + 4 tokens; for boxes, the longest target with 4 location and "
                                   "16 segmentation tokens and the label per object, + 4)")
    e.add_argument("--do-sample", action="store_true", help="with --data: sample answers instead of greedy decoding")
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--top-k", type=int, default=None)
    e.add_argument("--top-p", type=float, default=None)
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--n", type=int, default=200, help="held-out examples per task of the built-in world (default: "
                                                      "%(default)s)")
    e.add_argument("--tasks", nargs="+", default=None, help="world tasks to score (default: those the run trained on)")
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--quantize", choices=("int8", "int4"), help=QUANTIZE_HELP)
    e.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)
    e.add_argument("--cot-k", type=int, default=8, help="chains of thought sampled per question of a task asked with "
                                                       "one (compare_cot), for majority and routing (default: %(default)s)")
    e.add_argument("--cot-validation", type=int, default=100, help="validation questions the routing threshold is "
                                                                  "chosen on (default: %(default)s)")


def _other_commands(sub) -> None:
    c = sub.add_parser("convert", help="convert between Hugging Face and polymodal checkpoint directories (and a "
                                       "sharded training checkpoint to a plain one)")
    c.add_argument("source", help="with --to hf: a run directory (its best checkpoint, else its last) or a checkpoint "
                                  "directory; with --to polymodal: an HF model directory, or a sharded training "
                                  "checkpoint")
    c.add_argument("target", help="the directory to write (with --to hf: weights, config, tokenizer, processor "
                                  "and generation configs, a model card)")
    c.add_argument("--to", required=True, choices=("hf", "polymodal"))
    c.add_argument("--model-type", help="the HF model_type to write (with --to hf; default: the one the "
                                        "checkpoint's config implies), e.g. llama, gemma")
    c.add_argument("--max-shard-size", default="50GB", help="above this size the weights are written as HF's "
                                                            "shards + index, e.g. 5GB (default: %(default)s)")

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server and a chat page (pip install polymodal[serve])")
    s.add_argument("checkpoint", help="a checkpoint or model directory (or a run directory: its best checkpoint, "
                                      "else its last)")
    s.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    s.add_argument("--slots", type=int, default=8, help="requests decoded together (default: %(default)s)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before the server answers "
                                                             "429 (default: %(default)s)")
    s.add_argument("--max-body-mb", type=int, default=Limits.max_body_bytes >> 20,
                   help="largest request body in MiB, answered 413 before it is read (default: %(default)s)")
    s.add_argument("--mask-vae", default=None, metavar="VAE.npz",
                   help="the mask VQ-VAE (big_vision's vae-oid.npz layout) that decodes answers' segmentation tokens "
                        "into message.locations[i].mask (default: the model's own, if it holds one)")
    s.add_argument("--compile", action="store_true",
                   help="compile the batcher's decode step (torch.compile, dynamic shapes; the first steps pay the "
                        "compile time); default: eager")
    s.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)

    pl = sub.add_parser("plot", help="redraw a training run's loss.png from its metrics.jsonl")
    pl.add_argument("run", help="a run directory (holding metrics.jsonl)")
    pl.add_argument("--out", default=None, help="the PNG to write (default: RUN/loss.png)")

    x = sub.add_parser("export-data", help="write built-in world examples as a JSONL document file")
    x.add_argument("output", help="the .jsonl file to write (media go to <name>_media/ beside it)")
    x.add_argument("--n", type=int, default=100, help="number of documents (default: %(default)s)")
    x.add_argument("--split", choices=("train", "eval"), default="train")
    x.add_argument("--tasks", nargs="+", default=None, help=f"world tasks (default: all: {' '.join(WORLD.tasks)})")


def _checkpoint_dir(path: str) -> Path:
    """A model directory itself, or a run directory's best checkpoint (else its last); says which. It must hold weights."""
    from polymodal.runs import resolve

    directory, which = resolve(path)
    if directory != Path(path):
        print(which, file=sys.stderr, flush=True)
    return _with_weights(directory)


def _with_weights(directory: Path) -> Path:
    """`directory`, if it holds model weights as the loader finds them (`weights.weight_files`), or is a
    sharded training checkpoint or a LoRA adapter (whose base from_pretrained loads)."""
    from polymodal.convert.peft import ADAPTER_CONFIG
    from polymodal.weights import SHARDED, weight_files

    if not ((directory / ADAPTER_CONFIG).is_file() or (directory / SHARDED).is_dir()):
        weight_files(directory)
    return directory


def _load(path: str, quantize: str | None = None, role: str = "checkpoint", dtype: str = "float32"):
    import polymodal as pm
    from polymodal.families.collators import check_tokenizer
    from polymodal.data.tokenizer import Tokenizer

    directory = _checkpoint_dir(path)
    model = pm.from_pretrained(directory, quantize=quantize, dtype=torch_dtype(dtype))
    tokenizer = Tokenizer.from_file(directory)
    check_tokenizer(model.config, tokenizer, f"{role} {directory}")
    return directory, model, tokenizer


def torch_dtype(name: str):
    """A --dtype choice as `from_pretrained` takes it."""
    import torch

    return name if name == "auto" else getattr(torch, name)


def cmd_train(args: argparse.Namespace) -> None:
    from polymodal.train.checkpoint import list_checkpoints, read_trainer_state
    from polymodal.train.hooks import WorldAccuracy
    from polymodal.train.trainer import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}  # only the flags on the command line
    if given.get("init_from"):
        given = _fine_tuning(given)
    if given.get("resume"):  # continue the run as it was set up; flags given now override its settings
        for last in reversed(list_checkpoints(TrainConfig.from_dict(given).run_dir / "checkpoints")):
            try:  # the newest readable one; the trainer says which checkpoints it skips
                given = {**read_trainer_state(last)["train_config"], **given}
                break
            except (PolymodalError, KeyError, OSError):
                continue
    cfg = TrainConfig.from_dict(given)
    train(cfg, hooks=[WorldAccuracy(cfg.tasks)] if cfg.data == "world" else [])


def _fine_tuning(given: dict) -> dict:
    """--init-from's model is the one trained: a --model of another family is an error, and the run is named
    after the model trained (`<its directory>-tuned`) unless --name says otherwise."""
    from polymodal.config import read_json_config
    from polymodal.families import load_config
    from polymodal.train.trainer import model_config

    source = Path(given["init_from"])
    if not (source / "config.json").is_file():
        raise MissingFileError(f"--init-from expects a model directory (config.json + weights), got {source}")
    _with_weights(source)
    polymodal_dir = "config_class" in read_json_config(source / "config.json")  # else an HF directory
    base = type(load_config(source / "config.json")) if polymodal_dir else None
    named = type(model_config(given["model"])) if "model" in given else None
    if base is not None and named not in (None, base):
        raise ConfigError(f"--init-from {source} holds a {base.__name__} model, --model {given['model']} a "
                          f"{named.__name__}: the run trains --init-from's model; drop --model or give one of its "
                          "family")
    found = source.resolve()
    run = found.parent.parent if found.parent.name == "checkpoints" else found  # a run's checkpoint: the run
    return {"name": f"{run.name}-tuned", **given}


def cmd_generate(args: argparse.Namespace) -> None:
    from polymodal.families.collators import make_collator
    from polymodal.data.documents import Document, Segment
    from polymodal.families import spec_of
    from polymodal.generation.engine import generate
    from polymodal.generation.prompts import ContextError, prompts
    from polymodal.nn.language_model import LanguageModel

    segments = _media_segments(args)
    vae = _check_draw(args)
    directory, model, tokenizer = _load(args.checkpoint, args.quantize, dtype=args.dtype)
    draft = _load(args.assistant, role="--assistant (the draft)", dtype=args.dtype)[1] if args.assistant is not None else None
    if not isinstance(model, LanguageModel):
        raise InputError(f"{directory} holds a {type(model).__name__}, which embeds images and texts but writes "
                         "nothing; score it with `polymodal eval`")
    spans = model.image_spans
    draws = spans is not None and spans.begin is not None  # a model that writes images as tokens
    max_new = args.max_new_tokens
    if max_new is None:  # for a model that draws, room for one image more (begin, its codes, end)
        max_new = MAX_NEW_TOKENS + (spans.length + 2 if draws else 0)
    batch, _ = prompts(make_collator(model.config, tokenizer), [Document([*segments, Segment("text", args.prompt)])],
                       max_new)
    if spec_of(model).needs_image and not args.image:
        raise InputError(f"{directory} is a {type(model).__name__}, which answers about an image: give --image FILE "
                         "(HF's processor refuses a prompt without one too)")
    if draws and Path(args.image_dir).exists() and not Path(args.image_dir).is_dir():
        raise PathKindError(f"--image-dir expects a directory for the images drawn, got the file {args.image_dir}")
    try:
        new = generate(model, **batch, max_new_tokens=max_new, do_sample=args.do_sample,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, return_images=draws,
                       assistant_model=draft, num_assistant_tokens=args.num_assistant_tokens,
                       prompt_lookup_num_tokens=args.prompt_lookup)
    except ContextError as e:
        raise e.named("--max-new-tokens", note=f" ({directory})") from e
    if draws:
        new, [images] = new
        _save_images(images, Path(args.image_dir))
        if new[0].tolist().count(spans.begin) > len(images):
            print(f"polymodal generate: an image was begun but not finished: --max-new-tokens {max_new} ran out "
                  f"inside it (an image is {spans.length + 2} tokens); give a larger --max-new-tokens",
                  file=sys.stderr)
    answer = tokenizer.text(new[0]).strip()
    print(answer)
    if args.draw is not None:
        from polymodal.encoders.mask_vae import mask_vae_of

        _draw(answer, segments[0].media, Path(args.draw), vae or mask_vae_of(model))  # its own: a world segment run


def _check_draw(args: argparse.Namespace):
    """--draw's output (new, a .png) and one --image, checked before any compute; the --mask-vae loaded."""
    from polymodal.encoders.mask_vae import load_mask_vae

    if args.draw is None:
        if args.mask_vae is not None:
            raise InputError("--mask-vae decodes the masks --draw draws: give --draw OUT.png too")
        return None
    out = Path(args.draw)
    if out.suffix.lower() != ".png":
        raise InputError(f"--draw writes a PNG file: expected a path ending in .png, got {out}")
    if out.exists():
        raise ExistingFileError(f"--draw {out} exists; give a new path (nothing is overwritten)")
    if len(args.image) != 1 or args.audio:
        raise InputError(f"--draw draws over one image: expected one --image and no --audio, got {len(args.image)} "
                         f"image(s) and {len(args.audio)} audio file(s)")
    return load_mask_vae(args.mask_vae) if args.mask_vae is not None else None


def _draw(answer: str, image, out: Path, vae) -> None:
    from polymodal.data.locations import draw_locations, parse_locations
    from polymodal.serialization import atomic_write_bytes

    found = parse_locations(answer, (image.height, image.width), vae, boxes_only=vae is None)
    for obj in found.objects:
        mask = f", mask of {int(obj.mask.sum())} pixels" if obj.mask is not None else ""
        print(f"object {obj.label!r}: box (x1, y1, x2, y2) = ({', '.join(f'{v:.1f}' for v in obj.box)}){mask}")
    if found.malformed:
        print(f"polymodal generate: {found.malformed} part(s) of the answer were no well-formed object",
              file=sys.stderr)
    skipped = sum(obj.mask is None and bool(obj.codes) for obj in found.objects)
    if skipped:
        print(f"polymodal generate: the masks of {skipped} object(s) were skipped, their boxes drawn: the model holds "
              "no mask VQ-VAE to decode their segmentation tokens (give --mask-vae VAE.npz)", file=sys.stderr)
    buf = io.BytesIO()
    draw_locations(image, found).save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    print(f"wrote {out} ({len(found.objects)} object(s))")


def _media_segments(args: argparse.Namespace) -> list:
    """`polymodal generate`'s --image and --audio files, read, as document segments."""
    from polymodal.data.documents import Segment, load_media

    segments = []
    for flag, kind, paths in (("--image", "image", args.image), ("--audio", "audio", args.audio)):
        for path in paths:
            try:
                segments.append(Segment(kind, media=load_media(path, kind)))
            except ValueError as e:
                raise InputError(f"{flag}: {e}") from e
    return segments


def _save_images(images: list, folder: Path) -> None:
    for i, image in enumerate(images):
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"image_{i}.png")
        print(f"wrote {folder / f'image_{i}.png'}")


def _trainer_state(directory: Path) -> dict:
    """The checkpoint's trainer.json ({} when it has none); a file that is not one is an error naming it."""
    path = directory / "trainer.json"
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("train_config", {}), dict):
            raise TypeError(f"expected an object with a train_config object, got {type(state).__name__}")
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path} is not a readable trainer state ({type(e).__name__}: {e}); give --tasks "
                              "(or --data) to score without it") from e
    return state


def _trained_on(directory: Path) -> dict[str, str | None]:
    """The run's training and eval data files (absolute where the run recorded them so), or {} when unknown."""
    state = _trainer_state(directory)
    config = state.get("train_config", {})
    return state.get("data_source", {"data": config.get("data"), "eval_data": config.get("eval_data")})


def cmd_eval(args: argparse.Namespace) -> None:
    from polymodal.evaluate import table
    from polymodal.progress import Progress
    from polymodal.retrieval import score_retrieval, scorer
    from polymodal.evaluate_cot import VALIDATION_START

    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.data is not None:
        return eval_data(args)
    if given := [flag for flag, default in WITH_DATA.items() if getattr(args, flag) != default]:
        raise InputError(f"--{given[0].replace('_', '-')} applies to your own documents: give --data FILE with it "
                         "(the built-in world is scored with greedy answers)")
    if args.cot_k < 1 or args.cot_validation < 1:
        raise InputError(f"--cot-k and --cot-validation must be >= 1, got {args.cot_k} and {args.cot_validation}")
    if args.n > VALIDATION_START and any(t in COT_TASKS for t in args.tasks or ()):
        raise InputError(f"--n must be <= {VALIDATION_START} for chain-of-thought tasks (their validation questions "
                         f"start at eval example {VALIDATION_START}), got {args.n}")
    directory = _checkpoint_dir(args.checkpoint)
    tasks = args.tasks
    if tasks is None:
        source = _trained_on(directory)
        if source.get("data") not in (None, "world"):
            held_out = source.get("eval_data") or "held_out.jsonl"
            raise InputError(f"{args.checkpoint} was trained on {source['data']}, not the built-in world: score it on "
                             f"held-out documents of yours, e.g. `polymodal eval {args.checkpoint} --data {held_out}` "
                             "(or name the world's tasks with --tasks)")
        tasks = _trained_tasks(directory)
    for task in tasks:
        WORLD.choices(task)  # an unknown task fails here, before any work
    directory, model, tokenizer = _load(str(directory), args.quantize, dtype=args.dtype)  # resolved above, said once
    plain = tuple(t for t in tasks if t not in COT_TASKS)
    if plain:
        score = scorer(model)
        how = "image -> answer retrieval" if score is score_retrieval else "greedy answers"
        print(f"{directory}{_loaded_as(args)}: {how} on the built-in world's held-out split", flush=True)
        print(table(score(model, tokenizer, plain, args.n, WORLD, args.batch_size, progress=Progress)))
    cot = [t for t in tasks if t in COT_TASKS]
    if cot:
        eval_routing(args, directory, model, tokenizer, cot)


def _loaded_as(args: argparse.Namespace) -> str:
    loaded = ([f"{args.quantize} weight-only quantized"] if args.quantize else []) + \
        ([f"in {args.dtype}"] if args.dtype != "float32" else [])
    return f" (loaded {', '.join(loaded)})" if loaded else ""


WITH_DATA = {"metric": None, "out": None, "overwrite": False, "max_new_tokens": None, "do_sample": False,
             "temperature": 1.0, "top_k": None, "top_p": None, "seed": None}  # eval flags for --data, unset


def eval_data(args: argparse.Namespace) -> None:
    """`polymodal eval RUN --data FILE`: answers to the file's targets scored with --metric, beside baselines."""
    from polymodal.progress import Progress
    from polymodal.evaluate.report import check_out, table, write
    from polymodal.data.readers import DataNotFoundError
    from polymodal.evaluate.locations import THRESHOLDS
    from polymodal.evaluate.user_data import evaluate_file, read_documents
    from polymodal.evaluate.user_locations import located, locates, masks_note, table as located_table
    from polymodal.families import spec_of

    if args.metric is not None and args.metric not in METRIC_NAMES:
        raise InputError(f"--metric must be one of {', '.join(METRIC_NAMES)}, got {args.metric!r}")
    if args.tasks is not None:
        raise InputError("--tasks names tasks of the built-in world; with --data, give documents a \"task\" field")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval" / Path(args.data).stem
    check_out(out, args.overwrite)
    directory = _checkpoint_dir(args.checkpoint)
    docs = read_documents(args.data)  # the documents, and the run's training file for the majority answer
    train, train_docs = _trained_on(directory).get("data"), None
    if train not in (None, "world"):
        try:
            train_docs = read_documents(train, "the run's training file")
        except DataNotFoundError:
            print(f"polymodal eval: no majority baseline: the run's training file {train} is gone", file=sys.stderr)
    directory, model, tokenizer = _load(str(directory), args.quantize, dtype=args.dtype)  # resolved above, said once
    pairs = spec_of(model).pairs
    metric = args.metric or ("recall" if pairs else "boxes" if located(docs) else "exact")
    if pairs != (metric == "recall"):
        raise InputError(f"--metric {metric} does not fit a {type(model).__name__}: "
                         + ("a dual encoder writes no answers; it is scored by recall" if pairs else
                            f"recall scores dual encoders; this model writes answers: one of "
                            f"{', '.join(n for n in METRIC_NAMES if n != 'recall')}"))
    if metric == "boxes" and not locates(model, tokenizer):
        raise InputError(f"--metric boxes{' (the default: the targets hold objects)' if args.metric is None else ''} "
                         f"scores answers written as location tokens (<loc0000>..), and this {type(model).__name__} "
                         f"{'with its tokenizer ' if spec_of(model).locations else ''}writes boxes as text: score "
                         "that text (label [x1, y1, x2, y2]) with --metric exact")
    masks = masks_note(docs, model) if metric == "boxes" else None
    sampling = {"do_sample": args.do_sample, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "seed": args.seed}
    records, rows = evaluate_file(model, tokenizer, docs, args.data, metric, args.batch_size, args.max_new_tokens,
                                  sampling, train_docs, Progress)
    what = METRIC_WHAT[metric]
    how = "image -> caption retrieval" if pairs else ("sampled" if args.do_sample else "greedy") + " answers"
    print(f"{directory}{_loaded_as(args)}: {how} on {args.data}, {what}")
    if masks is not None and masks.startswith("not scored"):
        print(f"masks {masks}")
    print(located_table(rows) if metric == "boxes" else table(rows, what))
    write(out, records, {"checkpoint": str(directory), "data": str(args.data), "metric": metric,
                         "quantize": args.quantize, "dtype": args.dtype, "decoding": None if pairs else sampling,
                         "max_new_tokens": args.max_new_tokens, "training_data": train,
                         **({"masks": masks, "iou_thresholds": list(THRESHOLDS)} if masks is not None else {}),
                         "scores": rows})
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'results.json'}")


def _trained_tasks(directory: Path) -> tuple[str, ...]:
    """The world tasks the run trained on (the main job's when the checkpoint says nothing)."""
    tasks = _trainer_state(directory).get("train_config", {}).get("tasks", IMAGE_TASKS)
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
        raise CheckpointError(f"{directory / 'trainer.json'}: train_config.tasks must be a list of task names, got "
                              f"{tasks!r}")
    return tuple(tasks)


def eval_routing(args: argparse.Namespace, directory: Path, model, tokenizer, tasks: list[str]) -> None:
    """`polymodal eval`'s table for tasks asked with a chain of thought: greedy, CoT and routed side by side."""
    from polymodal.evaluate_cot import evaluate_routing, routing_table

    print(f"{directory}{_loaded_as(args)}: direct and chain-of-thought answers on the built-in world's held-out split")
    print(routing_table([evaluate_routing(model, tokenizer, t, args.n, WORLD, k=args.cot_k,
                                          validation=args.cot_validation, batch_size=args.batch_size)
                         for t in tasks]))


def cmd_convert(args: argparse.Namespace) -> None:
    from polymodal.convert.hf import FAMILIES
    from polymodal.weights import shard_size

    source, target = Path(args.source), Path(args.target)
    if args.to == "hf" and args.model_type is not None and args.model_type not in FAMILIES:
        raise InputError(f"--model-type must be one of {sorted(FAMILIES)}; got {args.model_type!r}")
    shard_size(args.max_shard_size)  # a bad size is refused before any work
    checkpoint = _checkpoint_dir(args.source) if args.to == "hf" else source  # a run directory: its checkpoint
    if not (checkpoint / "config.json").is_file():
        raise MissingFileError(f"{source} has no config.json: not a checkpoint directory")
    if target.resolve() in (source.resolve(), checkpoint.resolve()):
        raise InputError(f"convert writes a new directory: the target {target} is the source itself, whose "
                         "config.json and weights it would replace; give another target")
    if args.to == "hf":
        model_type = convert_to_hf(checkpoint, target, args.model_type, args.max_shard_size)
        print(f"wrote {target} (model_type {model_type}, from {checkpoint})")
        return
    convert_to_polymodal(source, target, args.max_shard_size)
    print(f"wrote {target}")


def convert_to_hf(checkpoint: Path, target: Path, model_type: str | None, max_shard_size: str) -> str:
    """A complete HF directory (weights in the checkpoint's dtype, config, tokenizer, processor, generation
    config, model card)."""
    from polymodal.convert.hf_export import export_hf, model_card, model_type_of
    from polymodal.data.tokenizer import Tokenizer
    from polymodal.train.trainer import load_base

    model = load_base(str(checkpoint), dtype="auto")  # a LoRA checkpoint: its adapter merged into the base
    has_tokenizer = any((checkpoint / name).is_file() for name in TOKENIZER_FILES[:2])
    tokenizer = Tokenizer.from_file(checkpoint) if has_tokenizer else None
    state = _trainer_state(checkpoint)
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    model_type = model_type or model_type_of(model)
    card = model_card(model_type, run, state.get("train_config", {}), state.get("step"))
    return export_hf(model, tokenizer, target, model_type, card, max_shard_size)


def convert_to_polymodal(source: Path, target: Path, max_shard_size: str) -> None:
    """An HF directory's weights (in its dtype), tokenizer and image processor settings (checked against
    polymodal's); or a training checkpoint that FSDP processes wrote sharded, as one plain directory."""
    import polymodal as pm
    from polymodal.convert.hf import load_hf
    from polymodal.convert.hf_export import check_processor
    from polymodal.convert.load import resolve_dtype
    from polymodal.data.tokenizer import Tokenizer
    from polymodal.convert.mask_vae_file import found_mask_vae
    from polymodal.weights import SHARDED, Weights

    if (source / SHARDED).is_dir():
        model = pm.from_pretrained(source)
    elif "config_class" in json.loads((source / "config.json").read_text()):
        raise InputError(f"{source} is already a polymodal checkpoint directory; --to polymodal reads an HF one "
                         "(or a sharded training checkpoint)")
    else:
        stored = resolve_dtype("auto", Weights(source))  # the files' own, whatever config.json says: no rounding
        model = found_mask_vae(load_hf(source, dtype=stored), source)  # an export's vae-oid.npz into the model
        if any((source / name).is_file() for name in TOKENIZER_FILES[:2]):
            check_processor(source, model, Tokenizer.from_file(source))
    pm.save_pretrained(model, target, max_shard_size=max_shard_size)
    for name in (*TOKENIZER_FILES, "preprocessor_config.json"):  # generate/eval find them beside the weights
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def cmd_export_data(args: argparse.Namespace) -> None:
    from polymodal.data.synthetic import export_jsonl

    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    output = Path(args.output)
    media = output.parent / f"{output.stem}_media"
    if output.exists() and not output.is_dir():  # a directory: write_jsonl names that mistake
        raise ExistingFileError(f"{output} exists; export-data never overwrites a file: give another path or "
                                "remove it first")
    if media.exists() and (not media.is_dir() or any(media.iterdir())):
        raise ExistingFileError(f"{media} exists and is not empty: export-data writes the media there and never "
                                "overwrites files; give another path or remove it first")
    export_jsonl(WORLD, output, args.split, args.n, args.tasks)
    print(f"wrote {args.n} documents to {args.output}")
    lines = Path(args.output).read_text().splitlines()
    for line in lines[:SHOWN_DOCUMENTS]:  # what to ask about which file, as `polymodal generate` takes them
        given, asked, answer = [], [], []
        for segment in json.loads(line)["segments"]:
            kind, value = next((k, v) for k, v in segment.items() if k not in ("target", "id"))
            if kind == "boxes":  # the objects as the README writes them: label [x1, y1, x2, y2] (mask file)
                value = " ; ".join(f"{o['label']} [{', '.join(f'{v:g}' for v in o['box'])}]"
                                   + (f" (mask {o['mask']})" if "mask" in o else "") for o in value)
            elif kind != "text":
                value = value if isinstance(value, str) else f"{value[0]} ... ({len(value)} frames)"
            (answer if segment.get("target") else asked if kind == "text" else given).append(value)
        print(f"  {' '.join(given) or '(no media)'}: {' '.join(asked)!r} -> {' '.join(answer)!r}")
    if len(lines) > SHOWN_DOCUMENTS:
        print(f"  ... ({len(lines) - SHOWN_DOCUMENTS} more)")


def cmd_plot(args: argparse.Namespace) -> None:
    from polymodal.train.plot import plot_metrics, read_metrics

    out = Path(args.out) if args.out else Path(args.run) / "loss.png"
    if out.suffix.lower() != ".png":
        raise InputError(f"--out must be a .png file, got {out}")
    if not plot_metrics(read_metrics(args.run), out):
        raise InputError(f"{args.run}/metrics.jsonl has no loss or eval records yet: nothing to draw")
    print(f"wrote {out}")


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from polymodal.serve.app import serve
    except ImportError as e:
        raise InputError(f"serving needs FastAPI and uvicorn: pip install 'polymodal[serve]' ({e})") from e

    if args.slots < 1 or args.max_queue < 0:
        raise InputError(f"--slots must be >= 1 and --max-queue >= 0, got {args.slots} and {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_body_mb < 1:
        raise InputError(f"--max-body-mb must be >= 1, got {args.max_body_mb}")
    serve(_checkpoint_dir(args.checkpoint), name=Path(args.checkpoint).resolve().name, host=args.host, port=args.port,
          slots=args.slots, max_queue=args.max_queue, limits=Limits(max_body_bytes=args.max_body_mb << 20),
          mask_vae=args.mask_vae, compile=args.compile, dtype=torch_dtype(args.dtype))


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "convert": cmd_convert,
            "export-data": cmd_export_data, "serve": cmd_serve, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (PolymodalError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError, ValueError, KeyError, OSError, SafetensorError) as e:  # a full disk, a read-only folder
        message = e.args[0] if isinstance(e, KeyError) and not isinstance(e, PolymodalError) and e.args else e
        print(f"polymodal {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: training saved a checkpoint and says where
        print(f"polymodal {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
