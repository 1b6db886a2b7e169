"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update,
y = W x + b + (alpha / r) B A dropout(x), A Kaiming-uniform and B zero at the start, as HF peft's `LoraLayer`.

A fused projection (QKV, gate/up) takes one (A, B) pair per named slice of its output rows, so each of HF's
separate `q_proj` / `k_proj` / `v_proj` has an adapter of its own and adapters map one to one onto peft's.
`LoRALinear` holds the base layer's own weight and bias under their old names: the base state-dict keys stay
as they are, and the adapter adds `lora_A.<slice>` / `lora_B.<slice>` beside them.

`TrainableRows` trains chosen rows of an embedding table (or of an untied output head) beside the adapters, as
peft's trainable tokens (`TrainableTokensLayer`): the tokens a fine-tune adds (PaliGemma's `<locNNNN>`) or whose
rows the checkpoint never trained. The rows hold their values, started from the base's, not a delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.errors import InputError, InputTypeError, check_number
from polymodal.nn.attention import Attention
from polymodal.nn.mlp import MLP


@dataclass(frozen=True)
class Slice:
    """Output rows [start, stop) of a linear layer, under the name HF gives that projection."""

    name: str
    start: int
    stop: int


@dataclass(frozen=True)
class Slot:
    """One linear layer LoRA may adapt: its module path, its named slices, and what it is part of."""

    path: str
    slices: tuple[Slice, ...]
    kind: str  # "attention" | "mlp" | "other"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, slices: tuple[Slice, ...], rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.slices = tuple(sorted(slices, key=lambda s: s.start))
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank  # rsLoRA (Kalajdzievski 2023)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ParameterDict({s.name: nn.Parameter(torch.empty(rank, self.in_features, **factory))
                                        for s in self.slices})
        self.lora_B = nn.ParameterDict({s.name: nn.Parameter(torch.zeros(s.stop - s.start, rank, **factory))
                                        for s in self.slices})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank update, (..., in) -> (..., out), zeros on rows no slice covers."""
        h = self.lora_dropout(x)
        pieces, row = [], 0
        for s in self.slices:
            if s.start > row:
                pieces.append(h.new_zeros(*h.shape[:-1], s.start - row))
            pieces.append(F.linear(F.linear(h, self.lora_A[s.name]), self.lora_B[s.name]) * self.scale)
            row = s.stop
        if row < self.out_features:
            pieces.append(h.new_zeros(*h.shape[:-1], self.out_features - row))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.delta(x)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + scale * B A (the same weight and bias tensors, updated in place)."""
        for s in self.slices:
            update = (self.lora_B[s.name].float() @ self.lora_A[s.name].float()) * self.scale
            self.weight[s.start:s.stop] += update.to(self.weight.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def check_row_ids(indices: list[int], rows: int) -> None:
    if not indices or len(set(indices)) != len(indices) or not all(0 <= int(i) < rows for i in indices):
        raise InputError(f"trainable token rows must be distinct ids in [0, {rows}), got "
                         f"{sorted(indices)[:4]}{'...' if len(indices) > 4 else ''} ({len(indices)} ids)")


class TrainableRows(nn.Module):
    """An nn.Embedding or a bias-free nn.Linear (an output head) whose rows `token_indices` train while the
    rest of `weight` (the base's own tensor, under its old name) stays frozen."""

    def __init__(self, base: nn.Embedding | nn.Linear, indices: list[int]):
        super().__init__()
        check_row_ids(indices, base.weight.shape[0])
        self.weight, self.embedding = base.weight, isinstance(base, nn.Embedding)
        self.register_buffer("token_indices", torch.tensor(list(indices), device=base.weight.device),
                             persistent=False)
        self.trainable_tokens = nn.Parameter(base.weight.detach()[self.token_indices].clone())

    def merged_weight(self) -> torch.Tensor:
        return self.weight.index_copy(0, self.token_indices, self.trainable_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.merged_weight()
        return F.embedding(x, w) if self.embedding else F.linear(x, w)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The plain module again, its weight (the same tensor) holding the trained rows."""
        self.weight[self.token_indices] = self.trainable_tokens.to(self.weight.dtype)
        rows, dim = self.weight.shape
        plain = nn.Embedding(rows, dim, device="meta") if self.embedding else nn.Linear(dim, rows, bias=False,
                                                                                          device="meta")
        plain.weight = self.weight
        return plain


def train_rows(model: nn.Module, paths: list[str], indices: list[int]) -> None:
    """Train rows `indices` of the embeddings / output heads at `paths` (the rest of the model as it was)."""
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, name)
        if isinstance(base, TrainableRows):
            raise InputError(f"{path} already trains rows; merge_lora(model) first to choose others")
        if not isinstance(base, (nn.Embedding, nn.Linear)) or getattr(base, "bias", None) is not None:
            raise InputTypeError(f"trainable rows are an embedding's or a bias-free head's; {path} is a "
                                 f"{type(base).__name__}")
        setattr(parent, name, TrainableRows(base, list(indices)))


def trained_rows(model: nn.Module) -> dict[str, TrainableRows]:
    return {path: m for path, m in model.named_modules() if isinstance(m, TrainableRows)}


def linear_slots(model: nn.Module) -> list[Slot]:
    """Every nn.Linear in the model, its rows named as HF names them: the fused QKV as q/k/v_proj, the
    output o_proj; a gated MLP's fused w_in as gate/up_proj, its w_out down_proj; a plain MLP fc1/fc2;
    any other linear layer by its attribute name."""
    slots: dict[str, Slot] = {}
    for path, m in model.named_modules():
        at = f"{path}." if path else ""
        if isinstance(m, Attention):
            q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
            if m.is_cross:
                slots[f"{at}wq"] = Slot(f"{at}wq", (Slice("q_proj", 0, q),), "attention")
                slots[f"{at}wkv"] = Slot(f"{at}wkv", (Slice("k_proj", 0, kv), Slice("v_proj", kv, 2 * kv)), "attention")
            else:
                slots[f"{at}wqkv"] = Slot(f"{at}wqkv", (Slice("q_proj", 0, q), Slice("k_proj", q, q + kv),
                                                        Slice("v_proj", q + kv, q + 2 * kv)), "attention")
            slots[f"{at}wo"] = Slot(f"{at}wo", (Slice("o_proj", 0, m.wo.out_features),), "attention")
        elif isinstance(m, MLP):
            hidden = m.w_out.in_features
            up = (Slice("gate_proj", 0, hidden), Slice("up_proj", hidden, 2 * hidden)) if m.gated else (
                Slice("fc1", 0, hidden),)
            slots[f"{at}w_in"] = Slot(f"{at}w_in", up, "mlp")
            slots[f"{at}w_out"] = Slot(f"{at}w_out", (Slice("down_proj" if m.gated else "fc2", 0, m.w_out.out_features),),
                                       "mlp")
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, LoRALinear)) and path not in slots:
            slots[path] = Slot(path, (Slice(path.rsplit(".", 1)[-1], 0, m.out_features),), "other")
    return list(slots.values())


def add(model: nn.Module, plan: dict[str, tuple[Slice, ...]], rank: int, alpha: float, dropout: float = 0.0,
        rslora: bool = False) -> None:
    """Wrap the linear layers at `plan`'s paths (with those slices) in LoRALinear; freeze everything else."""
    rank = check_number("LoRA rank", rank, integer=True, at_least=1)  # plain numbers: adapter_config.json holds them
    alpha = check_number("LoRA alpha", alpha, above=0)  # NaN or inf here would make every logit NaN
    dropout = check_number("LoRA dropout", dropout, at_least=0.0, below=1.0)
    if not isinstance(rslora, bool):
        raise InputTypeError(f"use_rslora must be true or false, got {rslora!r}")
    if not plan:
        raise InputError("LoRA needs at least one linear layer to adapt")
    model.requires_grad_(False)
    for path, slices in plan.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, name)
        if isinstance(base, LoRALinear):
            raise InputError(f"{path} already has a LoRA adapter; merge_lora(model) first to add another")
        if not isinstance(base, nn.Linear):
            raise InputTypeError(f"LoRA adapts nn.Linear layers; {path} is a {type(base).__name__}")
        setattr(parent, name, LoRALinear(base, slices, rank, alpha, dropout, rslora))


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge(model: nn.Module) -> None:
    """Fold every adapter (and trained rows) into its base weight and put the plain layer back (for export)."""
    for path, lora in {**adapters(model), **trained_rows(model)}.items():
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, lora.merged())
