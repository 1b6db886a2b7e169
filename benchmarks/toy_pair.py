"""A toy target/draft pair for speculative decoding, trained to convergence in a few CPU minutes.

The task, over a 16-token vocabulary: a fixed code for each of 32 digits,

    Q d1 .. d32 = c(d1) .. c(d32) <eos>          c(d) = (7 d + 3) mod 10, a permutation of the digits

Each output token reads one input token at a fixed distance, so a one-layer draft can learn the task as well
as the target, and the whole answer is the target's own greedy output. The target (6 layers, d=128) costs
several times the draft (1 layer, d=64) per forward, as in real speculative decoding. Each model trains on
the answers (the loss is on the tokens after `=`) until its greedy answers are right on VALIDATION held-out
questions (split 1) at least `converged` of the time (checked every CHECK_EVERY steps), up to a step limit;
the benchmark prompts are the test split (2). Training questions come from their own seeded generator and
are never a held-out one. A third model, the weak draft, is the draft's own run (same seed and schedule)
stopped as soon as its greedy choice is right on 85% of the validation answers' tokens (checked every step:
it learns the task within a few dozen steps), a draft whose proposals the target keeps about as often as a
real draft's.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

import polymodal as pm

Q, EQ, EOS = 10, 12, 15
VOCAB, DIGITS = 16, 32
HELD_OUT = 1000  # questions per held-out split
VALIDATION = 128  # validation questions checked during training
CHECK_EVERY = 50


def question(rng: random.Random) -> list[int]:
    return [rng.randrange(10) for _ in range(DIGITS)]


def document(digits: list[int]) -> list[int]:
    """The prompt (up to and including `=`) and its answer."""
    return [Q, *digits, EQ, *((7 * d + 3) % 10 for d in digits), EOS]


def questions(split: int, n: int) -> list[list[int]]:
    rng = random.Random(1000 + split)
    return [question(rng) for _ in range(n)]


def prompts(split: int, n: int) -> tuple[list[list[int]], list[list[int]]]:
    """The first n questions of a held-out split as prompts, and the answers (<eos> included)."""
    if n > HELD_OUT:
        raise ValueError(f"a held-out split has {HELD_OUT} questions, asked for {n}")
    docs = [document(q) for q in questions(split, n)]
    return [d[:DIGITS + 2] for d in docs], [d[DIGITS + 2:] for d in docs]


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[EOS] * (width - len(r)) + r for r in rows])
    am = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, am


@torch.no_grad()
def answer_accuracy(model: torch.nn.Module, split: int, n: int) -> float:
    """Share of the split's first n questions whose greedy continuation is exactly the right answer."""
    rows, answers = prompts(split, n)
    ids, am = left_padded(rows)
    new = pm.generate(model.eval(), ids, am, max_new_tokens=len(answers[0]), eos_token_id=EOS, pad_token_id=EOS)
    return sum(r == a for r, a in zip(new.tolist(), answers)) / n


@torch.no_grad()
def token_accuracy(model: torch.nn.Module, split: int, n: int) -> float:
    """Share of the answer tokens (<eos> included) of the split's first n questions that the model's greedy
    choice gets right after the right answer so far: the share of a perfect target's tokens it would draft."""
    ids = torch.tensor([document(q) for q in questions(split, n)])
    guess = model.eval()(ids).logits[:, DIGITS + 1:-1].argmax(-1)
    return (guess == ids[:, DIGITS + 2:]).float().mean().item()


def train(config: pm.DecoderConfig, max_steps: int, converged: float, seed: int, lr: float,
          batch: int = 32, score=answer_accuracy, check_every: int = CHECK_EVERY) -> tuple[torch.nn.Module, dict]:
    """Trains until `score` on the validation questions (by default the share of whole answers right)
    reaches `converged` (or max_steps); returns the model and its training log (steps, seconds, the last
    loss, the validation score at each check)."""
    torch.manual_seed(seed)
    model = pm.build(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    held_out = {tuple(q) for split in (1, 2) for q in questions(split, HELD_OUT)}
    log = {"checks": []}
    start = time.perf_counter()
    for step in range(1, max_steps + 1):
        docs = []
        while len(docs) < batch:
            if tuple(q := question(rng)) not in held_out:
                docs.append(document(q))
        ids = torch.tensor(docs)
        labels = ids.masked_fill(torch.arange(ids.shape[1]) <= DIGITS + 1, -100)  # the loss on the answers
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 50)
        loss = model.train()(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % check_every == 0 or step == max_steps:
            accuracy = score(model, 1, VALIDATION)
            log["checks"].append({"step": step, "loss": loss.item(), f"validation_{score.__name__}": accuracy})
            print(f"  {config.n_layers} layer(s) d={config.dim}: step {step} loss {loss.item():.4f} "
                  f"validation {score.__name__} {accuracy:.1%}", flush=True)
            if accuracy >= converged:
                break
    log.update(steps=step, seconds=time.perf_counter() - start, converged=accuracy >= converged)
    return model.eval(), log


TARGET = pm.DecoderConfig(vocab_size=VOCAB, dim=128, n_layers=6, n_heads=4, n_kv_heads=2, hidden_dim=384,
                          max_seq_len=80)
DRAFT = pm.DecoderConfig(vocab_size=VOCAB, dim=64, n_layers=1, n_heads=4, n_kv_heads=1, hidden_dim=192,
                         max_seq_len=80)


# name, config, seed, learning rate, the validation score that ends training, the score, steps between checks
MODELS = (("target", TARGET, 0, 1e-3, 1.0, answer_accuracy, CHECK_EVERY),
          ("draft", DRAFT, 1, 3e-3, 0.9, answer_accuracy, CHECK_EVERY),
          ("weak draft", DRAFT, 1, 3e-3, 0.85, token_accuracy, 1))  # the draft's run, stopped at 85% of tokens


def trained_models(directory: Path, max_steps: int) -> tuple[dict, dict]:
    """The target, the draft and the weak draft (name -> model), each trained once and kept in directory
    (polymodal checkpoints with their training logs), and their logs."""
    models, logs = {}, {}
    for name, config, seed, lr, converged, score, every in MODELS:
        path = directory / f"{name.replace(' ', '-')}-{config.n_layers}x{config.dim}-{DIGITS}digits-{max_steps}"
        if not (path / "config.json").exists():
            model, log = train(config, max_steps, converged, seed, lr, score=score, check_every=every)
            pm.save_pretrained(model, path)
            (path / "training.json").write_text(json.dumps(log, indent=2) + "\n")
        models[name] = pm.from_pretrained(path)
        logs[name] = json.loads((path / "training.json").read_text())
    return models, logs
