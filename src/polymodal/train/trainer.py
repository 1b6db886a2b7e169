"""One training loop for every family, in the shape of nanoGPT's train.py.

`model(**batch).loss` on batches from `data.collate`; AdamW (fused where available) with linear
warmup and cosine decay; gradient accumulation and clipping; bf16 autocast on CUDA; optional
activation checkpointing; FSDP2 or DDP under torchrun and the same code single-process; a
periodic eval loss; atomic checkpoints that resume exactly (weights, optimizer, schedule, RNG,
data position); a clear stop when the loss is no longer finite; Ctrl-C (SIGINT) finishes the step,
saves a checkpoint and raises `TrainingInterrupted`. Writes metrics.jsonl, a progress line and
loss.png (train/plot.py) into the run directory. Each eval measures the eval loss and the caller's
evaluation hooks (train/hooks.py; the CLI passes the built-in world's accuracy), keeps the checkpoint
best by `keep_best` (best.json; `polymodal.runs` resolves a run directory to it) and can stop early.

`train` is the loop; its steps: `setup` (checks, model, optimizer, `resume`), `train_step`, `evaluate`,
`save`, `finish`. `Run` holds what they share.

A step's loss is the mean over every target token of the global batch however it is split into
micro-batches and processes, so 1 process x 2 micro-batches computes what 2 processes x 1 do.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from polymodal.api import build, from_pretrained
from polymodal.families import load_config
from polymodal.convert.peft import adapter_layout, add_lora, load_adapter, merge_lora, write_adapter
from polymodal.config import Config, ConfigError, _check_choice, _check_positive
from polymodal.data.collate import Collator, count_targets
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.data.documents import Document, DocumentError, with_media
from polymodal.data.lazy import checked, document_texts
from polymodal.data.locations import LOC_TOKENS, SEG_TOKENS
from polymodal.data.readers import read_flagged
from polymodal.data.synthetic import WORLD
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.mask_vae import MaskVAE, load_mask_vae, mask_vae_of
from polymodal.errors import MissingFileError, PolymodalError, UnknownNameError, check_number
from polymodal.families import spec_of
from polymodal.nn.context_parallel import context_parallel
from polymodal.nn.lora import adapters
from polymodal.nn.transformer import Block
from polymodal.presets import PRESETS, get_preset
from polymodal.serialization import atomic_write_bytes
from polymodal.train import checkpoint as ckpt
from polymodal.train.distributed import (
    all_reduce_sum, barrier, data_and_context_split, gather_objects, gradient_sync, init_process, parallelize, shutdown)
from polymodal.train.hooks import EvalHook, EvalLoss, autocast, lower_is_better
from polymodal.train.plot import plot_metrics
from polymodal.convert.mask_vae_file import given_mask_vae, with_mask_vae
from polymodal.train.locations import asked_of, located, no_place_for, share_mask_vae, write_mask_vae
from polymodal.train.vq_stage import VQ_DOCS, fit_image_tokenizers, fit_mask_vaes

IMAGE_TASKS = ("caption", "colour", "shape", "count", "position")


@dataclass
class TrainConfig(Config):
    model: str = "paligemma-world"  # a preset name or a model config.json
    data: str = "world"  # "world" or your documents (JSONL, LLaVA/messages JSON, a datasets folder, parquet, tar shards)
    tasks: tuple[str, ...] = IMAGE_TASKS  # world tasks to train on
    eval_data: str | None = None  # documents for the eval loss, as --data (default: none, or the world's held-out split)
    tokenizer: str | None = None  # tokenizer file/dir; None trains a BPE on the data's text
    vocab_size: int = 512  # the most tokens that BPE may have
    out_dir: str = "runs"  # where run directories go
    name: str | None = None  # run directory out_dir/name; default: the model's name
    seed: int = 0  # initial weights, data order, dropout
    max_steps: int = 2500  # optimizer steps
    batch_size: int = 16  # documents per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate, after warmup
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 30  # linear warmup from 0
    weight_decay: float = 0.0  # AdamW decay on matrices (not on gains/biases)
    beta1: float = 0.9  # AdamW betas
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    max_len: int | None = None  # longest document in tokens (and packed row length); default: model context
    pack: bool = False  # pack each micro-batch's documents into rows of max_len tokens
    eval_every: int = 100  # steps between evals: eval loss and hooks (and at the end)
    eval_docs: int = 256  # documents in the eval loss
    log_every: int = 100  # steps between progress lines (metrics.jsonl gets every step)
    checkpoint_every: int = 500  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # the newest N are kept (and the best, see keep_best)
    keep_best: str = "auto"  # metric whose best eval keeps its checkpoint (auto: a hook's first, else eval_loss; none)
    early_stop: int | None = None  # stop after this many evals in a row without a better keep_best metric
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory
    compile: bool = False  # torch.compile every transformer block (the first steps pay for compiling)
    attention: str = "sdpa"  # "sdpa" | "flex" (FlexAttention block masks, CUDA only) | "eager" (reference)
    parallel: str = "fsdp"  # "fsdp" | "ddp", used under torchrun
    context_parallel: int = 1  # processes that split each sequence (ring attention); divides torchrun's process count
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    resume: bool = False  # continue from the run's last checkpoint, with its settings (flags given override them)
    init_from: str | None = None  # a model directory whose weights the run starts from (fine-tuning; replaces model)
    lora_rank: int | None = None  # train LoRA adapters of this rank on the init_from model, not its weights
    lora_alpha: float | None = None  # LoRA's scale is alpha / rank (default alpha: 2 x rank)
    lora_targets: str | None = None  # comma-separated layers, e.g. q,k,v,o (default: all attention + MLP)
    lora_dropout: float = 0.0  # dropout on LoRA's input
    lora_tokens: str | None = None  # token rows that train beside LoRA: "locations" (<locNNNN>, <segNNN>) or ids 1,2
    strict_paths: bool = False  # refuse JSONL media paths that lead outside the JSONL's folder (absolute, .., links)
    vq_steps: int = 400  # a model that writes images (masks) first fits its VQ tokenizer (mask VQ-VAE) (0: as built)
    mask_vae: str | None = None  # a mask VQ-VAE file (vae-oid.npz) coding the data's masks, for a model holding none
    trainable: tuple[str, ...] | None = None  # model parts to train, the rest frozen (Flamingo: perceiver cross_layers)

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        _check_positive(self, "vocab_size", "max_steps", "batch_size", "grad_accum", "lr", "eval_every",
                        "eval_docs", "log_every", "checkpoint_every", "keep_checkpoints", "max_len",
                        "context_parallel", "early_stop")
        _check_choice("parallel", self.parallel, ("fsdp", "ddp"))
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("attention", self.attention, ("sdpa", "flex", "eager"))
        for task in self.tasks:
            _check_choice("task", task, WORLD.tasks)
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.context_parallel > 1 and self.compile:
            raise ConfigError("--compile does not compile ring attention's point-to-point ring: "
                              "use --context-parallel without --compile")
        check_number("seed", self.seed, integer=True, at_least=0, below=2 ** 31, error=ConfigError)  # numpy's limit
        for name in ("warmup_steps", "weight_decay", "grad_clip", "vq_steps"):
            check_number(name, getattr(self, name), at_least=0, error=ConfigError)
        for name in ("beta1", "beta2"):
            check_number(name, getattr(self, name), at_least=0, below=1, error=ConfigError)
        if self.lora_rank is not None:
            check_number("lora_rank (or unset: train every weight)", self.lora_rank, integer=True, at_least=1,
                         error=ConfigError)
        if self.lora_alpha is not None:
            check_number("lora_alpha", self.lora_alpha, above=0, error=ConfigError)
        check_number("lora_dropout", self.lora_dropout, at_least=0, below=1, error=ConfigError)
        if self.lora_rank is not None and self.init_from is None:
            raise ConfigError("lora_rank adapts a trained model: give init_from, the model directory to adapt")
        if self.lora_rank is not None and self.trainable is not None:
            raise ConfigError("lora_rank trains adapters only: give it or trainable, not both")
        if self.trainable is not None:
            if isinstance(self.trainable, str) or not self.trainable:
                raise ConfigError(f"trainable must be a non-empty list of part names, got {self.trainable!r}")
            self.trainable = tuple(self.trainable)
        if self.lora_rank is None and (self.lora_alpha, self.lora_targets, self.lora_tokens) != (None, None, None):
            raise ConfigError("lora_alpha, lora_targets and lora_tokens need lora_rank")
        if self.lora_tokens is not None:
            listed_token_ids(self.lora_tokens)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / (self.name or Path(self.model).stem)


class TrainingError(PolymodalError, RuntimeError):
    """Training cannot go on: a loss that is not finite, a run directory in the way."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training at a step boundary, after saving a checkpoint; the message says where."""


@contextlib.contextmanager
def interrupt_flag():
    """Yields a one-item list set to True by the first SIGINT; a second SIGINT interrupts at once."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield flag
        return

    def on_sigint(signum, frame):
        flag[0] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps (step counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


def model_config(spec: str) -> Config:
    if spec in PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MissingFileError(f"model {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                                "nor a config.json file or a directory holding one")
    return load_config(path)


@dataclass
class Data:
    train: Callable[[int], Document]  # the i-th training document, for i = 0, 1, 2, ... forever
    eval: list[Document]
    texts: Iterable[str]  # what a tokenizer is trained on (streamed: a large set never sits in memory)
    checks: list[tuple[str, Sequence[Document]]]  # (where from, documents): what to validate before training
    size: int = VQ_DOCS  # training documents before they repeat (a file's; the world's never do)


def load_data(cfg: TrainConfig) -> Data:
    """Data positions are plain counters, so resuming at a position needs no iterator state. A large set is
    checked on `checked`'s spread of documents before training, the rest as batches read them."""
    eval_docs = ([with_media(d, cfg.eval_data) for d in read_flagged("--eval-data", cfg.eval_data, strict_paths=cfg.strict_paths)
                  [:cfg.eval_docs]] if cfg.eval_data else [])
    checks = [(cfg.eval_data, eval_docs)] if cfg.eval_data else []
    if cfg.data == "world":
        tasks = cfg.tasks

        def sample(i: int, split: str = "train") -> Document:  # round robin over the tasks
            return WORLD.sample(tasks[i % len(tasks)], i // len(tasks), split).document

        texts = WORLD.texts(tasks) + [t for d in eval_docs for t in d.texts]
        if not cfg.eval_data:
            eval_docs = [sample(i, "eval") for i in range(cfg.eval_docs)]
            checks = [("the built-in world's held-out split", eval_docs)]
        checks = [(f"--tasks {task} (the built-in world)", [sample(i)]) for i, task in enumerate(tasks)] + checks
        return Data(sample, eval_docs, texts, checks)
    docs = read_flagged("--data", cfg.data, strict_paths=cfg.strict_paths)
    orders: dict[int, np.ndarray] = {}

    def shuffled(i: int) -> Document:  # a fresh permutation of the file every epoch
        epoch = i // len(docs)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = np.random.default_rng([cfg.seed, epoch]).permutation(len(docs))
        return with_media(docs[orders[epoch][i % len(docs)]], cfg.data)

    texts = itertools.chain(document_texts(docs), document_texts(eval_docs))
    return Data(shuffled, eval_docs, texts, [(cfg.data, checked(docs)), *checks], len(docs))


def check_documents(collator: Collator, data: Data, config: Config) -> None:
    """Every document the run will read must fit the model: its kinds of media and layout, its length
    (max_len), something to learn from, and masks only for a model that writes them. Checked before any training,
    so that a bad document deep in a file stops the run now, not hours in (and not one process of several, leaving
    the others waiting)."""
    for source, docs in data.checks:
        for i, doc in enumerate(docs):  # media one document at a time: a large data set never sits in memory
            doc = with_media(doc, source)
            try:
                if not spec_of(config).locations and any(s.masks is not None for s in doc.segments):
                    raise DocumentError(no_place_for(config, masks=True))
                collator.encode(doc, index=None if doc.line is not None else i)
            except ValueError as e:
                where = f"{source}, line {doc.line}" if doc.line is not None else source
                raise DocumentError(f"{where}: {e}") from e


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains and biases (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


class Log:
    """metrics.jsonl (one record per step and per eval), the progress line, loss.png; main rank only."""

    def __init__(self, run: Path, start_step: int, max_steps: int, enabled: bool):
        self.path, self.enabled, self.max_steps = run / "metrics.jsonl", enabled, max_steps
        self.start_step, self.t0, self.tokens = start_step, time.time(), 0.0
        if enabled and self.path.exists():  # a resumed run forgets steps after its checkpoint
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= start_step]
            atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode())

    def write(self, record: dict, show: bool, best: str | None = None) -> None:
        """An eval record (no "loss") shows its eval loss and the keep-best metric `best`."""
        if not self.enabled:
            return
        self.tokens += record.get("tokens", 0)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not show:
            return
        if "loss" not in record:
            shown = [m for m in dict.fromkeys(("eval_loss", best)) if m in record]
            print(f"eval step {record['step']} | " + " | ".join(
                f"{m.removeprefix('eval_')} {record[m]:.4f}" for m in shown), flush=True)
            return
        elapsed = time.time() - self.t0
        eta = elapsed / (record["step"] - self.start_step) * (self.max_steps - record["step"])
        print(f"step {record['step']}/{self.max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
              f"{self.tokens / elapsed:,.0f} tok/s | {elapsed:.0f}s | eta {eta:.0f}s", flush=True)

    def plot(self, png: Path) -> None:
        if self.enabled:
            plot_metrics([json.loads(line) for line in self.path.read_text().splitlines()], png)


def _step(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except json.JSONDecodeError:
        return math.inf


def load_base(directory: str, dtype: torch.dtype | str | None = None, mask_vae: MaskVAE | None = None
              ) -> torch.nn.Module:
    """The model a fine-tuning run starts from (its LoRA adapter merged, if it has one), float32 unless `dtype`,
    holding `mask_vae` if given (else the directory's own `vae-oid.npz`, which `from_pretrained` joins)."""
    model = from_pretrained(directory, dtype=dtype)
    model = merge_lora(model) if adapters(model) else model
    return with_mask_vae(model, mask_vae) if mask_vae is not None else model


@dataclass
class Best:
    """The --keep-best metric's best value so far, where, and the evals since it last improved."""
    metric: str | None
    step: int | None = None
    value: float | None = None
    stale: int = 0

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """True when this eval is the best so far (its checkpoint is then kept)."""
        if self.metric is None:
            return False
        value = metrics[self.metric]
        better = self.value is None or (value < self.value if lower_is_better(self.metric) else value > self.value)
        if better:
            self.step, self.value, self.stale = step, value, 0
        else:
            self.stale += 1
        return better


@dataclass
class Run:
    """Everything a training run holds between steps: set up by `setup`, advanced by `train_step`."""
    cfg: TrainConfig
    proc: object  # train.distributed's process info
    config: Config
    tokenizer: Tokenizer
    collator: Collator
    data: Data
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    hooks: list  # EvalHook: the eval loss first, then the caller's (main process of a 1-process run only)
    best: Best
    layout: object  # a LoRA run's adapter layout, else None
    log: Log | None = None
    step: int = 0
    docs_seen: int = 0

    @property
    def root(self) -> Path:
        return self.cfg.run_dir / "checkpoints"


def train(cfg: TrainConfig, hooks: list[EvalHook] = ()) -> Path:
    """Train as `cfg` says; returns the run directory. `hooks` (train/hooks.py) are measured at each eval
    beside the eval loss. Launch under torchrun for several processes."""
    proc = init_process(cfg.device)
    try:
        with interrupt_flag() as interrupted:
            run = setup(cfg, proc, list(hooks))
            while run.step < cfg.max_steps and not interrupted_save(run, interrupted):
                train_step(run)
                at_eval = bool(run.hooks) and (run.step % cfg.eval_every == 0 or run.step == cfg.max_steps)
                stop = at_eval and evaluate(run)
                if (run.step % cfg.checkpoint_every == 0 or run.step == cfg.max_steps) and not saved(run):
                    save(run)
                if stop:
                    break
            finish(run)
            return cfg.run_dir
    finally:
        shutdown()


def setup(cfg: TrainConfig, proc, hooks: list[EvalHook]) -> Run:
    """Check what the run will read, build (or resume) model and optimizer, write the run's header files."""
    if cfg.attention == "flex" and proc.device.type != "cuda":
        raise ConfigError(f"attention 'flex' trains on CUDA only (PyTorch has no FlexAttention backward on CPU); "
                          f"this run's device is {proc.device.type}: use attention 'sdpa'")
    root = cfg.run_dir / "checkpoints"
    last = ckpt.latest_checkpoint(root)
    if last is not None and not cfg.resume:
        raise TrainingError(f"{cfg.run_dir} already holds checkpoint {last.name}; pass --resume to continue it, "
                            "or give another --name")
    if cfg.resume and last is None:
        raise TrainingError(f"nothing to resume: no checkpoint in {root}")
    lora_tokens = lora_token_ids(cfg)  # before any weights are read
    vae = load_mask_vae(cfg.mask_vae) if cfg.mask_vae else None  # a bad file is refused before any model loads
    base = load_base(cfg.init_from, mask_vae=vae) if cfg.init_from else None
    resumed = ckpt.load_latest(root, say=print if proc.main else lambda message: None) if cfg.resume else None
    last = resumed[0] if resumed is not None else None
    config = (load_config(last / "config.json") if last is not None else base.config if base is not None
              else model_config(cfg.model))
    vae = vae if base is None and last is None else None  # a fresh model's, loaded into it (not fitted)
    config = given_mask_vae(config, vae) if vae is not None else config
    data = load_data(cfg)
    # what the documents' objects ask of the model, refused now if it has no place for them
    asked = cfg.tasks if cfg.data == "world" else asked_of(config, data.checks)
    config, tokenizer = choose_tokenizer(cfg, config, data, last, asked)
    collator = make_collator(config, tokenizer, cfg.max_len)
    if collator.max_len > collator.format.max_len:
        raise ConfigError(f"max_len must be at most the model's context of {collator.format.max_len} tokens, "
                          f"got {collator.max_len}")
    if spec_of(config).pairs and (cfg.pack or cfg.context_parallel > 1):
        raise ConfigError("a dual encoder trains on image-caption pairs, one per row: --pack and --context-parallel "
                          "do not apply")
    hooks = ([EvalLoss(data.eval, collator, cfg.batch_size, cfg.pack, proc.device)] if data.eval else []) + (
        hooks if proc.world_size == 1 else [])  # generation on a model sharded over processes is not collective-safe
    best = Best(best_metric(cfg, hooks))
    check_documents(collator, data, config)
    model, layout = build_model(cfg, config, data, base, last, proc, lora_tokens, vae)
    run = Run(cfg, proc, config, tokenizer, collator, data, model, make_optimizer(model, cfg), hooks, best, layout)
    if last is not None:
        resume(run, last, resumed[1])
        if proc.main:
            print(f"resumed from {last} at step {run.step}", flush=True)
    else:
        random.seed(cfg.seed + proc.rank)
        np.random.seed(cfg.seed + proc.rank)
        torch.manual_seed(cfg.seed + proc.rank)  # each rank its own dropout stream
    if spec_of(config).locations:
        share_mask_vae(run.model, collator)  # the targets' masks are coded with the fitted (or resumed) VAE
    if proc.main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(cfg.run_dir)
        cfg.to_json(cfg.run_dir / "train_config.json")
        n_params = sum(p.numel() for p in model.parameters())
        lora = f" ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable: LoRA rank " \
               f"{cfg.lora_rank})" if cfg.lora_rank else ""
        keep = f"; keeps the best checkpoint by {best.metric}" if best.metric else ""
        print(f"{type(config).__name__} ~{n_params / 1e6:.2f}M parameters{lora}, vocab {tokenizer.vocab_size}, "
              f"{proc.world_size} process(es) on {proc.device}; run dir {cfg.run_dir}{keep}", flush=True)
    run.log = Log(cfg.run_dir, run.step, cfg.max_steps, proc.main)
    return run


def choose_tokenizer(cfg: TrainConfig, config: Config, data: Data, last: Path | None,
                     asked: tuple[str, ...]) -> tuple[Config, Tokenizer]:
    """A resumed run's tokenizer, a fine-tuned model's, the one given, or a BPE trained on the data's text (the
    model's vocabulary then fitted to it). The location tasks `asked` by the world, or by a user's documents of a
    fresh model (one fine-tuned keeps its vocabulary), give it their tokens (`train/locations.located`)."""
    world = asked if cfg.data == "world" else ()
    if last is not None:
        tokenizer = Tokenizer.from_file(last)
        return located(world, config, tokenizer, fresh=False), tokenizer
    if cfg.init_from and not cfg.tokenizer:
        tokenizer = Tokenizer.from_file(cfg.init_from)  # the vocabulary the weights were trained with
        return located(world, config, tokenizer, fresh=False), tokenizer
    tokenizer = Tokenizer.from_file(cfg.tokenizer) if cfg.tokenizer else Tokenizer.train(data.texts, cfg.vocab_size)
    config = located(world if cfg.init_from else asked, config, tokenizer, fresh=cfg.init_from is None)
    return fit_to_tokenizer(config, tokenizer), tokenizer


def best_metric(cfg: TrainConfig, hooks: list[EvalHook]) -> str | None:
    """The metric --keep-best names ("auto": the first hook's first metric past the eval loss, else the eval
    loss; "none": none), checked against what the run's evals measure before any training."""
    measured = [m for hook in hooks for m in hook.metrics]
    if cfg.keep_best == "none":
        metric = None
    elif cfg.keep_best == "auto":
        metric = next((m for m in measured if m != "eval_loss"), measured[0] if measured else None)
    elif cfg.keep_best not in measured:
        why = " (a hook's metrics are measured in 1-process runs only)" if cfg.keep_best else ""
        raise ConfigError(f"keep_best {cfg.keep_best!r} is not measured by this run's evals{why}: expected one of "
                          f"{measured or 'nothing (give --eval-data for an eval loss)'}, 'auto' or 'none'")
    else:
        metric = cfg.keep_best
    if cfg.early_stop is not None and metric is None:
        raise ConfigError("early_stop counts evals without a better keep_best metric: this run measures none "
                          "(give --eval-data, or leave out --early-stop)")
    return metric


LORA_TOKENS = "lora_tokens (--lora-tokens)"


def listed_token_ids(spec: str) -> list[int] | None:
    """--lora-tokens' ids when it lists them (None for "locations"); a ConfigError naming the flag for anything
    but "locations" or distinct comma-separated integers >= 0."""
    if isinstance(spec, str) and spec.strip() == "locations":
        return None
    try:
        ids = [int(t) for t in spec.split(",")]
    except (AttributeError, ValueError):
        ids = None
    if ids is None or min(ids) < 0:
        raise ConfigError(f"{LORA_TOKENS} must be 'locations' or comma-separated token ids (integers >= 0), got "
                          f"{spec!r}")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ConfigError(f"{LORA_TOKENS} must list each token id once, got {spec!r} (repeated: "
                          f"{', '.join(map(str, repeated))})")
    return ids


def lora_token_ids(cfg: TrainConfig) -> list[int] | None:
    """--lora-tokens as ids of the run's tokenizer (--tokenizer, else --init-from's: a LoRA run keeps the
    vocabulary it adapts), read before any weights: "locations" (every location and segmentation token) or the
    ids listed, each below the tokenizer's size."""
    if cfg.lora_tokens is None:
        return None
    source = cfg.tokenizer or cfg.init_from
    tokenizer = Tokenizer.from_file(source)
    ids = listed_token_ids(cfg.lora_tokens)
    if ids is None:
        try:
            return [tokenizer.token_id(t) for t in LOC_TOKENS + SEG_TOKENS]
        except UnknownNameError:
            raise ConfigError(f"{LORA_TOKENS} 'locations': the tokenizer of {source} has no location tokens "
                              "(<loc0000>..); give a converted HF PaliGemma, or a tokenizer given them by "
                              "add_location_tokens") from None
    outside = [i for i in ids if i >= tokenizer.vocab_size]
    if outside:
        raise ConfigError(f"{LORA_TOKENS} must be ids of the tokenizer of {source}, in [0, {tokenizer.vocab_size}), "
                          f"got {', '.join(map(str, outside[:5]))}{' ...' if len(outside) > 5 else ''}")
    return ids


def build_model(cfg: TrainConfig, config: Config, data: Data, base, last: Path | None, proc,
                lora_tokens: list[int] | None = None, mask_vae: MaskVAE | None = None):
    """The model on its device, wrapped for FSDP/DDP (and LoRA, activation checkpointing, compile, context
    parallelism as asked), with the adapter layout of a LoRA run (else None). `mask_vae`: a fresh model's, given
    (not fitted)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (  # takes seconds: only when training
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build(config, backend=cfg.attention)
    if cfg.trainable is not None:  # before any work: an unknown part is an error naming the model's parts
        if not spec_of(config).trains_parts:
            raise ConfigError(f"trainable names parts of a multimodal model; a {type(model).__name__} has none: "
                              "leave it out to train every weight")
        model.trainable(cfg.trainable)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"trainable {list(cfg.trainable)} leaves nothing to train in this "
                              f"{type(model).__name__} (a part its config leaves out has no weights)")
    if base is not None:
        model.load_state_dict(base.state_dict())
    if mask_vae is not None:
        mask_vae_of(model).load_state_dict(mask_vae.state_dict())
    if base is None and last is None and cfg.vq_steps:  # a resumed run's checkpoint holds its fitted VQ
        for fit in (fit_image_tokenizers,) + ((fit_mask_vaes,) if mask_vae is None else ()):  # a given VAE stays
            fit(model, data.train, cfg.vq_steps, cfg.seed,
                say=lambda line: print(line, flush=True) if proc.main else None, show_progress=proc.main,
                n_docs=data.size)
    _, _, context_mesh = data_and_context_split(proc, cfg.context_parallel)
    if context_mesh is not None:  # its processes read the same documents: data parallel over data_world only
        model = context_parallel(model, context_mesh)
    layout = None
    if cfg.lora_rank is not None:
        targets = [t.strip() for t in cfg.lora_targets.split(",")] if cfg.lora_targets else None
        add_lora(model, cfg.lora_rank, cfg.lora_alpha or 2 * cfg.lora_rank, targets, cfg.lora_dropout,
                 trainable_tokens=lora_tokens)
        if last is not None:
            load_adapter(model, last)
        layout = adapter_layout(model)  # before wrappers rename modules
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block),
                                       checkpoint_wrapper_fn=partial(checkpoint_wrapper,
                                                                     checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    if cfg.compile:
        for block in blocks:
            block.compile()
    return parallelize(model.to(proc.device), cfg.parallel, blocks), layout


def resume(run: Run, last: Path, state: tuple) -> None:
    """Weights, optimizer, step, data position, best-so-far and each rank's RNG streams from a checkpoint."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model_state, optimizer_state, trainer_state = state
    if ckpt.is_sharded(last):  # written by FSDP processes, however many: read into this run's shards
        ckpt.load_sharded(last, run.model, run.optimizer, optimizer_state)
    else:
        if model_state is not None:  # a LoRA run's adapter was loaded before sharding, its base from init_from
            set_model_state_dict(run.model, model_state, options=full_state())
        set_optimizer_state_dict(run.model, run.optimizer, optimizer_state, options=full_state())
    run.step, run.docs_seen = trainer_state["step"], trainer_state["docs_seen"]
    best = trainer_state.get("best", {})
    if best.get("metric") == run.best.metric:  # a run resumed with another --keep-best starts its count afresh
        run.best = Best(**best)
        if run.proc.main and run.best.step is not None:  # a kill between a best checkpoint and best.json
            ckpt.write_best(run.root, run.best.step, run.best.metric, run.best.value)
    ckpt.set_rng_state(trainer_state["rng"][run.proc.rank % len(trainer_state["rng"])])  # each rank its own


def full_state(trained_only: bool = False):
    """Whole tensors on rank 0's CPU: what a checkpoint holds (`trained_only`: of the parameters that train)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions  # takes seconds: only when training

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)


def interrupted_save(run: Run, interrupted: list[bool]) -> bool:
    """On the first Ctrl-C of any rank (every rank learns of it here), save and raise TrainingInterrupted."""
    if not all_reduce_sum(torch.tensor([float(interrupted[0])], device=run.proc.device)).item():
        return False
    save(run)
    raise TrainingInterrupted(f"interrupted at step {run.step}/{run.cfg.max_steps}: saved checkpoint "
                              f"{ckpt.step_dir(run.root, run.step)}; continue with --resume")


def train_step(run: Run) -> None:
    """One optimizer step on the next global batch; its record goes to metrics.jsonl."""
    cfg, device, W, t = run.cfg, run.proc.device, run.proc.world_size, time.time()
    data_rank, data_world, _ = data_and_context_split(run.proc, cfg.context_parallel)
    lr = lr_at(run.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    B = cfg.batch_size
    # micro-batch m of data rank r takes documents [(m * data_world + r) * B, ... + B) of this step's slice
    micro = [run.collator([run.data.train(run.docs_seen + (m * data_world + data_rank) * B + j) for j in range(B)],
                          pack=cfg.pack) for m in range(cfg.grad_accum)]
    counts = all_reduce_sum(torch.tensor([float(sum(count_targets(b) for b in micro)),
                                          float(sum(int(b["attention_mask"].sum()) for b in micro))],
                                         device=device))  # NCCL reduces device tensors only
    # counted once per process of a context group, which compute the same loss: the sum of their
    # gradients is context_parallel times theirs, and W / n_targets undoes both
    n_targets, n_tokens = counts.tolist()
    # a dual encoder's loss over every process: each one's images against all the processes' captions
    loss_options = {"all_ranks": True} if spec_of(run.config).pairs and data_world > 1 else {}
    total = torch.zeros((), device=device)
    for m, batch in enumerate(micro):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with gradient_sync(run.model, m == len(micro) - 1):
            with autocast(device):
                loss_sum = run.model(**batch, **loss_options).loss.float() * count_targets(batch)
            (loss_sum * (W / n_targets)).backward()  # DDP/FSDP average over ranks: undo it
        total += loss_sum.detach()
    loss = all_reduce_sum(total).item() / n_targets
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or math.inf)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingError(f"loss {loss} / gradient norm {grad_norm} is not finite at step {run.step + 1} "
                            f"(lr {lr:.2e}); stopped before updating the weights. Last checkpoint: "
                            f"{ckpt.latest_checkpoint(run.root) or 'none'}. Try a lower --lr or a --grad-clip.")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step, run.docs_seen = run.step + 1, run.docs_seen + B * cfg.grad_accum * data_world
    run.log.write({"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens": n_tokens / cfg.context_parallel, "step_s": time.time() - t},
                  show=run.step % cfg.log_every == 0 or run.step in (1, cfg.max_steps))


def evaluate(run: Run) -> bool:
    """Measure every hook; keep this step's checkpoint when it is the best so far. True: stop early."""
    run.model.eval()
    metrics = {}
    for hook in run.hooks:
        metrics.update(hook(run.model, run.tokenizer))
    run.model.train()
    run.log.write({"step": run.step, **metrics}, show=True, best=run.best.metric)
    if run.best.update(run.step, metrics):
        if not saved(run):
            save(run)
        if run.proc.main:
            ckpt.write_best(run.root, run.step, run.best.metric, run.best.value)
            ckpt.prune(run.root, run.cfg.keep_checkpoints)
        barrier()
    stop = run.cfg.early_stop is not None and run.best.stale >= run.cfg.early_stop
    if stop and run.proc.main:
        print(f"early stop at step {run.step}: {run.best.metric} has not improved in {run.best.stale} evals since "
              f"step {run.best.step} ({run.best.value:.4g})", flush=True)
    return stop


def saved(run: Run) -> bool:
    """Whether this step's checkpoint is written (a best one, or a run resumed at its last step)."""
    return ckpt.step_dir(run.root, run.step).is_dir()


def save(run: Run) -> None:
    """A checkpoint of this step. Several FSDP processes each write their own shards (nothing is gathered;
    train/checkpoint.py); otherwise every rank takes part in gathering the whole state (a LoRA run's: the adapter
    alone, written in peft's layout however many processes trained it) and the main rank writes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    cfg, proc = run.cfg, run.proc
    state = {"step": run.step, "docs_seen": run.docs_seen, "rng": gather_objects(ckpt.rng_state()),
             "train_config": cfg.to_dict(), "best": vars(run.best),
             "data_source": {k: v if v in (None, "world") else str(Path(v).resolve())  # for `polymodal eval`
                             for k, v in (("data", cfg.data), ("eval_data", cfg.eval_data))}}
    directory = ckpt.step_dir(run.root, run.step)
    vae = partial(write_mask_vae, run.collator) if spec_of(run.config).locations else None  # none where it has none
    if proc.world_size > 1 and cfg.parallel == "fsdp" and cfg.lora_rank is None:
        ckpt.save_sharded(directory, run.config, run.model, run.optimizer, state, run.tokenizer, proc.main, vae)
    else:
        # a LoRA run keeps only what trains: the frozen base is never gathered
        model_state = get_model_state_dict(run.model, options=full_state(trained_only=cfg.lora_rank is not None))
        optimizer_state = get_optimizer_state_dict(run.model, run.optimizer, options=full_state())
        if proc.main and cfg.lora_rank is None:
            ckpt.save_checkpoint(directory, run.config, model_state, optimizer_state, state, run.tokenizer, vae)
        elif proc.main:  # only the adapter trained: it is what the checkpoint keeps
            base_dir = Path(cfg.init_from).resolve()

            def adapter_files(d: Path) -> None:
                write_adapter(run.layout, d, model_state, base_dir)
                if vae is not None:  # the base directory may lack the VAE (--mask-vae)
                    vae(d)
            ckpt.save_checkpoint(directory, run.config, None, optimizer_state, state, run.tokenizer,
                                 write_extra=adapter_files)
    if proc.main:
        ckpt.prune(run.root, cfg.keep_checkpoints)
    barrier()


def finish(run: Run) -> None:
    """A checkpoint of the last step (an early stop's), loss.png, and the line naming the checkpoints."""
    if not saved(run):
        save(run)
    run.log.plot(run.cfg.run_dir / "loss.png")
    if run.proc.main:
        best = f"; best {ckpt.step_dir(run.root, run.best.step)} by {run.best.metric} ({run.best.value:.4g})" \
            if run.best.step is not None else ""
        print(f"done: {run.step} steps; checkpoint {ckpt.latest_checkpoint(run.root)}{best}", flush=True)
