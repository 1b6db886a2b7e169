"""One training loop for every family, in the shape of nanoGPT's train.py.

`model(**batch).loss` on batches from `data.collate`; AdamW (fused where available) with linear
warmup and cosine decay; gradient accumulation and clipping; bf16 autocast on CUDA; optional
activation checkpointing; FSDP2 or DDP under torchrun and the same code single-process; a
periodic eval loss; atomic checkpoints that resume exactly (weights, optimizer, schedule, RNG,
data position); a clear stop when the loss is no longer finite; Ctrl-C (SIGINT) finishes the step,
saves a checkpoint and raises `TrainingInterrupted`. Writes metrics.jsonl, a progress line and
loss.png (train/plot.py) into the run directory; on the built-in world each eval also scores greedy
answers per task (metrics.jsonl and loss.png).

A step's loss is the mean over every target token of the global batch however it is split into
micro-batches and processes, so 1 process x 2 micro-batches computes what 2 processes x 1 do.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from polymodal.api import build, from_pretrained
from polymodal.models import load_config
from polymodal.convert.peft import adapter_layout, add_lora, load_adapter, merge_lora, write_adapter
from polymodal.config import Config, ConfigError, _check_choice, _check_positive
from polymodal.data.collate import Collator, count_targets
from polymodal.data.collators import fit_to_tokenizer, make_collator
from polymodal.data.documents import Document, DocumentError, read_jsonl, with_media
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import PolymodalError, check_number
from polymodal.models.contrastive import ContrastiveConfig
from polymodal.nn.context_parallel import context_parallel
from polymodal.nn.lora import adapters
from polymodal.nn.transformer import Block
from polymodal.presets import PRESETS, get_preset
from polymodal.retrieval import scorer
from polymodal.serialization import atomic_write_bytes
from polymodal.train import checkpoint as ckpt
from polymodal.train.distributed import (
    all_reduce_sum, barrier, data_and_context_split, gather_objects, gradient_sync, init_process, parallelize, shutdown)
from polymodal.train.plot import plot_metrics
from polymodal.train.vq_stage import fit_image_tokenizers

IMAGE_TASKS = ("caption", "colour", "shape", "count", "position")
WORLD = World(seed=0)  # the built-in data set; eval reads the same world's held-out split
ACCURACY_DOCS = 32  # held-out examples per task scored at each eval of a single-process run on the world


@dataclass
class TrainConfig(Config):
    model: str = "paligemma-world"  # a preset name or a model config.json
    data: str = "world"  # "world" (the built-in world) or a JSONL file of documents
    tasks: tuple[str, ...] = IMAGE_TASKS  # world tasks to train on
    eval_data: str | None = None  # JSONL for the eval loss (default: none, or the world's held-out split)
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
    eval_every: int = 300  # steps between eval losses (and at the end)
    eval_docs: int = 256  # documents in the eval loss
    log_every: int = 100  # steps between progress lines (metrics.jsonl gets every step)
    checkpoint_every: int = 500  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # the newest N are kept
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
    strict_paths: bool = False  # refuse JSONL media paths that lead outside the JSONL's folder (absolute, .., links)
    vq_steps: int = 400  # a model that writes images first fits its VQ tokenizer to the training images (0: as built)
    trainable: tuple[str, ...] | None = None  # model parts to train, the rest frozen (Flamingo: perceiver cross_layers)

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        _check_positive(self, "vocab_size", "max_steps", "batch_size", "grad_accum", "lr", "eval_every",
                        "eval_docs", "log_every", "checkpoint_every", "keep_checkpoints", "max_len",
                        "context_parallel")
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
        if self.lora_rank is None and (self.lora_alpha, self.lora_targets) != (None, None):
            raise ConfigError("lora_alpha and lora_targets need lora_rank")

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
        raise FileNotFoundError(f"model {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                                "nor a config.json file or a directory holding one")
    return load_config(path)


@dataclass
class Data:
    train: Callable[[int], Document]  # the i-th training document, for i = 0, 1, 2, ... forever
    eval: list[Document]
    texts: list[str]  # what a tokenizer is trained on
    checks: list[tuple[str, list[Document]]]  # (where from, documents): what to validate before training


def _read(flag: str, path: str, strict_paths: bool) -> list[Document]:
    """The documents of a JSONL file with their media unread: each is loaded when a batch needs it."""
    if not Path(path).is_file():
        given = "a directory" if Path(path).is_dir() else "no such file"
        raise FileNotFoundError(f"{flag} expects a JSONL file of documents, got {path!r} ({given})")
    docs = read_jsonl(path, load_media=False, strict_paths=strict_paths)
    if not docs:
        raise ValueError(f"{flag} {path} holds no documents")
    return docs


def load_data(cfg: TrainConfig) -> Data:
    """Data positions are plain counters, so resuming at a position needs no iterator state."""
    eval_docs = ([with_media(d, cfg.eval_data) for d in _read("--eval-data", cfg.eval_data, cfg.strict_paths)
                  [:cfg.eval_docs]] if cfg.eval_data else [])
    checks = [(cfg.eval_data, eval_docs)] if cfg.eval_data else []
    if cfg.data == "world":
        tasks = cfg.tasks

        def sample(i: int, split: str = "train") -> Document:  # round robin over the tasks
            return WORLD.sample(tasks[i % len(tasks)], i // len(tasks), split).document

        texts = WORLD.texts() + [t for d in eval_docs for t in d.texts]
        if not cfg.eval_data:
            eval_docs = [sample(i, "eval") for i in range(cfg.eval_docs)]
            checks = [("the built-in world's held-out split", eval_docs)]
        checks = [(f"--tasks {task} (the built-in world)", [sample(i)]) for i, task in enumerate(tasks)] + checks
        return Data(sample, eval_docs, texts, checks)
    docs = _read("--data", cfg.data, cfg.strict_paths)
    orders: dict[int, np.ndarray] = {}

    def shuffled(i: int) -> Document:  # a fresh permutation of the file every epoch
        epoch = i // len(docs)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = np.random.default_rng([cfg.seed, epoch]).permutation(len(docs))
        return with_media(docs[orders[epoch][i % len(docs)]], cfg.data)

    return Data(shuffled, eval_docs, [t for d in docs + eval_docs for t in d.texts], [(cfg.data, docs), *checks])


def check_documents(collator: Collator, data: Data) -> None:
    """Every document the run will read must fit the model: its kinds of media and layout, its length
    (max_len) and something to learn from. Checked before any training, so that a bad document deep in
    a file stops the run now, not hours in (and not one process of several, leaving the others waiting)."""
    for source, docs in data.checks:
        for i, doc in enumerate(docs):  # media one document at a time: a large data set never sits in memory
            doc = with_media(doc, source)
            try:
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

    def write(self, record: dict, show: bool) -> None:
        if not self.enabled:
            return
        self.tokens += record.get("tokens", 0)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not show:
            return
        if "eval_loss" in record:
            print(f"eval step {record['step']} | loss {record['eval_loss']:.4f}", flush=True)
            return
        elapsed = time.time() - self.t0
        eta = elapsed / (record["step"] - self.start_step) * (self.max_steps - record["step"])
        print(f"step {record['step']}/{self.max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
              f"{self.tokens / elapsed:,.0f} tok/s | {elapsed:.0f}s | eta {eta:.0f}s", flush=True)

    def plot(self, png: Path) -> None:
        if self.enabled:
            plot_metrics([json.loads(line) for line in self.path.read_text().splitlines()], png)


def task_accuracy(model: torch.nn.Module, tokenizer: Tokenizer, tasks: tuple[str, ...]) -> dict[str, float]:
    """Accuracy per task on the first ACCURACY_DOCS held-out examples of the built-in world: greedy answers,
    or image -> caption retrieval for a dual encoder."""
    model.eval()
    scores = scorer(model)(model, tokenizer, tasks, ACCURACY_DOCS, WORLD, baselines=False)
    model.train()
    return {s.task: s.accuracy for s in scores}


def _step(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except json.JSONDecodeError:
        return math.inf


def load_base(directory: str) -> torch.nn.Module:
    """The model a fine-tuning run starts from (its LoRA adapter merged, if it has one)."""
    model = from_pretrained(directory)
    return merge_lora(model) if adapters(model) else model


def train(cfg: TrainConfig) -> Path:
    """Train as `cfg` says; returns the run directory. Launch under torchrun for several processes."""
    proc = init_process(cfg.device)
    try:
        with interrupt_flag() as interrupted:
            return _train(cfg, proc, interrupted)
    finally:
        shutdown()


def _train(cfg: TrainConfig, proc, interrupted: list[bool]) -> Path:
    # imported here, not at the top: they take seconds, which `polymodal eval`/`generate` need not wait
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)

    if cfg.attention == "flex" and proc.device.type != "cuda":
        raise ConfigError(f"attention 'flex' trains on CUDA only (PyTorch has no FlexAttention backward on CPU); "
                          f"this run's device is {proc.device.type}: use attention 'sdpa'")
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU
    run, W = cfg.run_dir, proc.world_size
    data_rank, data_world, context_mesh = data_and_context_split(proc, cfg.context_parallel)
    ckpt_root = run / "checkpoints"
    last = ckpt.latest_checkpoint(ckpt_root)
    if last is not None and not cfg.resume:
        raise TrainingError(f"{run} already holds checkpoint {last.name}; pass --resume to continue it, "
                            "or give another --name")
    if cfg.resume and last is None:
        raise TrainingError(f"nothing to resume: no checkpoint in {ckpt_root}")
    base = load_base(cfg.init_from) if cfg.init_from else None
    resumed = ckpt.load_latest(ckpt_root, say=print if proc.main else lambda message: None) if cfg.resume else None
    last = resumed[0] if resumed is not None else None
    config = (load_config(last / "config.json") if last is not None else base.config if base is not None
              else model_config(cfg.model))
    data = load_data(cfg)
    if last is not None:
        tokenizer = Tokenizer.from_file(last)
    elif cfg.init_from and not cfg.tokenizer:
        tokenizer = Tokenizer.from_file(cfg.init_from)  # the vocabulary the weights were trained with
    else:
        tokenizer = Tokenizer.from_file(cfg.tokenizer) if cfg.tokenizer else Tokenizer.train(data.texts, cfg.vocab_size)
        config = fit_to_tokenizer(config, tokenizer)
    collator = make_collator(config, tokenizer, cfg.max_len)
    if collator.max_len > collator.format.max_len:
        raise ConfigError(f"max_len must be at most the model's context of {collator.format.max_len} tokens, "
                          f"got {collator.max_len}")
    pairs = isinstance(config, ContrastiveConfig)
    if pairs and (cfg.pack or cfg.context_parallel > 1):
        raise ConfigError("a dual encoder trains on image-caption pairs, one per row: --pack and --context-parallel "
                          "do not apply")
    # a dual encoder's loss over every process: each one's images against all the processes' captions
    loss_options = {"all_ranks": True} if pairs and data_world > 1 else {}
    check_documents(collator, data)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build(config, backend=cfg.attention)
    if cfg.trainable is not None:  # before any work: an unknown part is an error naming the model's parts
        if not hasattr(model, "trainable"):
            raise ConfigError(f"trainable names parts of a multimodal model; a {type(model).__name__} has none: "
                              "leave it out to train every weight")
        model.trainable(cfg.trainable)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"trainable {list(cfg.trainable)} leaves nothing to train in this "
                              f"{type(model).__name__} (a part its config leaves out has no weights)")
    if base is not None:
        model.load_state_dict(base.state_dict())
    elif last is None and cfg.vq_steps:  # a resumed run's checkpoint holds its fitted VQ
        fit_image_tokenizers(model, data.train, cfg.vq_steps, cfg.seed,
                             say=lambda line: print(line, flush=True) if proc.main else None)
    if context_mesh is not None:  # its processes read the same documents: data parallel over data_world only
        model = context_parallel(model, context_mesh)
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.lora_rank is not None:
        targets = [t.strip() for t in cfg.lora_targets.split(",")] if cfg.lora_targets else None
        add_lora(model, cfg.lora_rank, cfg.lora_alpha or 2 * cfg.lora_rank, targets, cfg.lora_dropout)
        if last is not None:
            load_adapter(model, last)
    layout = adapter_layout(model) if cfg.lora_rank is not None else None  # before wrappers rename modules
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block),
                                       checkpoint_wrapper_fn=partial(checkpoint_wrapper,
                                                                     checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    if cfg.compile:
        for block in blocks:
            block.compile()
    model = parallelize(model.to(proc.device), cfg.parallel, blocks)
    optimizer = make_optimizer(model, cfg)
    sharded = W > 1 and cfg.parallel == "fsdp" and cfg.lora_rank is None  # checkpoints: see train/checkpoint.py
    step = docs_seen = 0
    if last is not None:
        model_state, optimizer_state, state = resumed[1]
        if ckpt.is_sharded(last):  # written by FSDP processes, however many: read into this run's shards
            ckpt.load_sharded(last, model, optimizer, optimizer_state)
        else:
            if model_state is not None:  # a LoRA run's adapter was loaded before sharding, its base from init_from
                set_model_state_dict(model, model_state, options=full)
            set_optimizer_state_dict(model, optimizer, optimizer_state, options=full)
        step, docs_seen = state["step"], state["docs_seen"]
        ckpt.set_rng_state(state["rng"][proc.rank % len(state["rng"])])  # each rank its own, if as many ranks
        if proc.main:
            print(f"resumed from {last} at step {step}", flush=True)
    else:
        random.seed(cfg.seed + proc.rank)
        np.random.seed(cfg.seed + proc.rank)
        torch.manual_seed(cfg.seed + proc.rank)  # each rank its own dropout stream
    if proc.main:
        run.mkdir(parents=True, exist_ok=True)
        tokenizer.save(run)
        cfg.to_json(run / "train_config.json")
        lora = f" ({n_trainable:,} trainable: LoRA rank {cfg.lora_rank})" if cfg.lora_rank else ""
        print(f"{type(config).__name__} ~{n_params / 1e6:.2f}M parameters{lora}, vocab {tokenizer.vocab_size}, "
              f"{W} process(es) on {proc.device}; run dir {run}", flush=True)
    log = Log(run, step, cfg.max_steps, proc.main)
    autocast = (partial(torch.autocast, "cuda", dtype=torch.bfloat16) if proc.device.type == "cuda"
                else contextlib.nullcontext)
    B = cfg.batch_size

    def on_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(proc.device, non_blocking=True) for k, v in batch.items()}

    def evaluate() -> float:
        """Mean eval loss over all eval documents; every rank computes it (FSDP needs them all)."""
        model.eval()
        total = n = 0.0
        with torch.no_grad(), autocast():
            for i in range(0, len(data.eval), B):
                batch = on_device(collator(data.eval[i:i + B], pack=cfg.pack))
                k = count_targets(batch)
                total, n = total + model(**batch).loss.item() * k, n + k
        model.train()
        return total / n

    def save() -> None:
        if sharded:  # each process writes its own shards: nothing is gathered
            state = {"step": step, "docs_seen": docs_seen, "rng": gather_objects(ckpt.rng_state()),
                     "train_config": cfg.to_dict()}
            ckpt.save_sharded(ckpt.step_dir(ckpt_root, step), config, model, optimizer, state, tokenizer, proc.main)
            if proc.main:
                ckpt.prune(ckpt_root, cfg.keep_checkpoints)
            barrier()
            return
        model_state = get_model_state_dict(model, options=full)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=full)
        rngs = gather_objects(ckpt.rng_state())
        if proc.main:
            state = {"step": step, "docs_seen": docs_seen, "rng": rngs, "train_config": cfg.to_dict()}
            if cfg.lora_rank is None:
                ckpt.save_checkpoint(ckpt.step_dir(ckpt_root, step), config, model_state, optimizer_state, state,
                                     tokenizer)
            else:  # only the adapter trained: it is what the checkpoint keeps
                base_dir = Path(cfg.init_from).resolve()
                ckpt.save_checkpoint(ckpt.step_dir(ckpt_root, step), config, None, optimizer_state, state, tokenizer,
                                     write_adapter=lambda d: write_adapter(layout, d, model_state, base_dir))
            ckpt.prune(ckpt_root, cfg.keep_checkpoints)
        barrier()

    model.train()
    while step < cfg.max_steps:
        t = time.time()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # micro-batch m of data rank r takes documents [(m * data_world + r) * B, ... + B) of this step's slice
        micro = [collator([data.train(docs_seen + (m * data_world + data_rank) * B + j) for j in range(B)], pack=cfg.pack)
                 for m in range(cfg.grad_accum)]
        counts = all_reduce_sum(torch.tensor([float(sum(count_targets(b) for b in micro)),
                                              float(sum(int(b["attention_mask"].sum()) for b in micro)),
                                              float(interrupted[0])],
                                             device=proc.device))  # NCCL reduces device tensors only
        # counted once per process of a context group, which compute the same loss: the sum of their
        # gradients is context_parallel times theirs, and W / n_targets undoes both
        n_targets, n_tokens, n_interrupted = counts.tolist()
        if n_interrupted:  # every rank learns of a Ctrl-C here, so all of them save and stop together
            save()
            raise TrainingInterrupted(f"interrupted at step {step}/{cfg.max_steps}: saved checkpoint "
                                      f"{ckpt.step_dir(ckpt_root, step)}; continue with --resume")
        total = torch.zeros((), device=proc.device)
        for m, batch in enumerate(micro):
            batch = on_device(batch)
            with gradient_sync(model, m == len(micro) - 1):
                with autocast():
                    loss_sum = model(**batch, **loss_options).loss.float() * count_targets(batch)
                (loss_sum * (W / n_targets)).backward()  # DDP/FSDP average over ranks: undo it
            total += loss_sum.detach()
        loss = all_reduce_sum(total).item() / n_targets
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = ckpt.latest_checkpoint(ckpt_root)
            raise TrainingError(f"loss {loss} / gradient norm {grad_norm} is not finite at step {step + 1} "
                                f"(lr {lr:.2e}); stopped before updating the weights. Last checkpoint: "
                                f"{last or 'none'}. Try a lower --lr or a --grad-clip.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, docs_seen = step + 1, docs_seen + B * cfg.grad_accum * data_world
        log.write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens / cfg.context_parallel,
                   "step_s": time.time() - t}, show=step % cfg.log_every == 0 or step in (1, cfg.max_steps))
        if data.eval and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            record = {"step": step, "eval_loss": evaluate()}
            if cfg.data == "world" and W == 1:  # generation on a model sharded over processes is not collective-safe
                record["eval_accuracy"] = task_accuracy(model, tokenizer, cfg.tasks)
            log.write(record, show=True)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            save()
    log.plot(run / "loss.png")
    if proc.main:
        print(f"done: {step} steps; checkpoint {ckpt.latest_checkpoint(ckpt_root)}", flush=True)
    return run
