"""A toy task where a chain of thought helps, and a tiny target/draft pair trained on it in minutes on a CPU.

The parity of 12 bits (chance: 50%), asked two ways over a 16-token vocabulary:

    chain of thought:  Q b1 .. b12 = s1 .. s12 ; A s12 <eos>     s_i = b1 xor .. xor b_i, the running parities
    direct:            D b1 .. b12 = A s12 <eos>

Each running parity is one local step (the bit 13 tokens back xor the parity just written), so a chain is
easy to write; the direct answer needs all 12 bits at once, which small transformers learn poorly. The
chains are also predictable text, so a small draft model agrees with the target often. Both models are
trained on an even mix of the two forms, on questions from their own seeded generator that are never one
of the first HELD_OUT validation (split 1) or test (split 2) questions.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

import polymodal as pm

Q, D, EQ, SEP, A, EOS = 10, 11, 12, 13, 14, 15
VOCAB = 16
HELD_OUT = 1000  # questions per held-out split
CHANCE = 0.5  # a parity


def question(rng: random.Random) -> list[int]:
    return [rng.randrange(2) for _ in range(12)]


def running(digits: list[int]) -> list[int]:
    out, s = [], 0
    for d in digits:
        s ^= d
        out.append(s)
    return out


def chain(digits: list[int]) -> list[int]:
    sums = running(digits)
    return [Q, *digits, EQ, *sums, SEP, A, sums[-1], EOS]


def direct(digits: list[int]) -> list[int]:
    return [D, *digits, EQ, A, running(digits)[-1], EOS]


def questions(split: int, n: int) -> list[list[int]]:
    rng = random.Random(1000 + split)
    return [question(rng) for _ in range(n)]


def prompts(split: int, n: int, cot: bool) -> tuple[list[list[int]], list[int]]:
    """The first n questions of a split as prompts (up to and including `=`), and their answers."""
    if n > HELD_OUT:
        raise ValueError(f"a held-out split has {HELD_OUT} questions, asked for {n}")
    qs = questions(split, n)
    return [[Q if cot else D, *q, EQ] for q in qs], [running(q)[-1] for q in qs]


def answer_after_a(tokens: list[int]) -> int | None:
    """The extraction rule: the digit after the first `A`."""
    if A in tokens:
        i = tokens.index(A)
        if i + 1 < len(tokens) and tokens[i + 1] < 10:
            return tokens[i + 1]
    return None


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[EOS] * (width - len(r)) + r for r in rows])
    am = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, am


def train(config: pm.DecoderConfig, steps: int, seed: int, batch: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = pm.build(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    held_out = {tuple(q) for split in (1, 2) for q in questions(split, HELD_OUT)}

    def fresh() -> list[int]:
        while tuple(q := question(rng)) in held_out:
            pass
        return q

    for step in range(steps):
        rows = [(chain if i % 2 else direct)(fresh()) for i in range(batch)]
        width = max(map(len, rows))
        ids = torch.tensor([r + [EOS] * (width - len(r)) for r in rows])
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 50) * (1 - step / steps)
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


TARGET = pm.DecoderConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192,
                          max_seq_len=64)
DRAFT = pm.DecoderConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=96,
                         max_seq_len=64)


def trained_pair(directory: Path, steps: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The target and draft, trained once and kept in directory (polymodal checkpoints)."""
    models = []
    for name, config, seed in (("target", TARGET, 0), ("draft", DRAFT, 1)):
        path = directory / f"{name}-{steps}"
        if not (path / "config.json").exists():
            pm.save_pretrained(train(config, steps, seed), path)
        models.append(pm.from_pretrained(path))
    return models[0], models[1]
