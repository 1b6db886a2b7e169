"""Configs: nested dataclasses validated in `__post_init__` that round-trip to JSON.

An unknown key, a misspelled choice or an inconsistent shape is an error that names what was
expected and what was given; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from polymodal.errors import ConfigError, check_number

T = TypeVar("T", bound="Config")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_types(obj: Any) -> None:
    """Each field whose annotation is built of int, float, bool, str and None holds one of those: None where an
    int is due would fail later as a TypeError deep in the model, 1e300 for a layer count as an OverflowError."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint, value = hints[f.name], getattr(obj, f.name)
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if not set(allowed) <= {int, float, bool, str, type(None)} or any(isinstance(value, a) for a in allowed
                                                                          if a is not int and a is not float):
            continue  # a nested config, a tuple, a dict: their own checks; or a bool, str or None where allowed
        number = isinstance(value, numbers.Real) if float in allowed else isinstance(value, numbers.Integral)
        fits = not isinstance(value, (bool, str)) and value is not None and (float in allowed or int in allowed) and number
        if not fits:  # named by the field's own types: a bool field given 1 is not "an integer" short
            kinds = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
                     type(None): "None"}
            kind = " or ".join(kinds[a] for a in allowed if not (a is int and float in allowed))
            raise ConfigError(f"{type(obj).__name__}.{f.name} must be {kind}, got {value!r} ({type(value).__name__})")
        if type(value) not in (int, float):  # a numpy scalar, which config.json could not hold: made plain
            object.__setattr__(obj, f.name, int(value) if isinstance(value, numbers.Integral) else float(value))


def _check_positive(obj: Any, *names: str) -> None:
    """Every field of the type its annotation names (`_check_types`), every number finite (JSON and Python both
    allow NaN and inf), and `names` > 0."""
    cls = type(obj).__name__
    _check_types(obj)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{cls}.{f.name} must be a finite number, got {value}")
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            check_number(f"{cls}.{name}", value, above=0, error=ConfigError)


def _check_token_ids(obj: Any, vocab_size: int, *names: str) -> None:
    """Token ids a config names (an int, a list of them, or None) must lie in the vocabulary."""
    for name in names:
        value = getattr(obj, name)
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size):
                raise ConfigError(f"{type(obj).__name__}.{name} must be a token id in [0, {vocab_size}) "
                                  f"(the vocabulary), got {value!r}")


class Config:
    """Mixin giving dataclass configs strict dict/JSON round-trips."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} expects a dict, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for {cls.__name__}; valid options: {sorted(fields)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in data.items():
            if not _fits(hints[name], value):
                raise ConfigError(f"{cls.__name__}.{name} must be {_describe(hints[name])}, got {value!r} "
                                  f"({type(value).__name__})")
            sub = _config_class(hints[name])
            kwargs[name] = sub.from_dict(value) if sub is not None and isinstance(value, dict) else value
        required = [n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing := [n for n in required if n not in data]:
            raise ConfigError(f"{cls.__name__} needs the section(s) {missing}, missing from the config")
        return cls(**kwargs)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps({"config_class": type(self).__name__, **self.to_dict()}, indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


_SCALARS = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _fits(hint: Any, value: Any) -> bool:
    """Whether a (JSON) value can fill a field of this type hint: scalars strictly (a bool is not an int,
    "2" is not a number), containers by kind; a nested config may come as a dict."""
    if hint is Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in _SCALARS:
        return isinstance(value, _SCALARS[hint]) and (hint is bool or not isinstance(value, bool))
    kind = typing.get_origin(hint) or hint
    if kind in (tuple, list):
        return isinstance(value, (tuple, list))
    if kind is dict:
        return isinstance(value, dict)
    if isinstance(kind, type) and issubclass(kind, Config):
        return isinstance(value, (dict, kind))
    return True


def _describe(hint: Any) -> str:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return " or ".join("None" if h is type(None) else getattr(h, "__name__", str(h)) for h in options)


def _config_class(hint: Any) -> type[Config] | None:
    """The Config subclass inside a type hint such as `VisionConfig | None`, if any."""
    candidates = typing.get_args(hint) or (hint,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, Config):
            return c
    return None


@dataclass
class DecoderConfig(Config):
    """A decoder-only transformer language model (Llama, Gemma, Magneto, ...)."""

    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (MHA); 1: MQA; otherwise GQA
    head_dim: int | None = None  # None: dim // n_heads
    hidden_dim: int = 512  # MLP width
    mlp: str = "swiglu"  # "swiglu" | "geglu" (tanh-GELU gate) | "gelu" | "relu2" (squared ReLU, Persimmon)
    norm: str = "rmsnorm"  # "rmsnorm" | "rmsnorm_gemma" ((1 + w) scale) | "layernorm" | "layernorm_nobias" (Cohere)
    norm_eps: float = 1e-6
    norm_placement: str = "pre"  # "pre" | "post" | "sub" (Magneto sub-LN) | "swin" (x + norm(f(x)), Chameleon)
    parallel_blocks: bool = False  # x + attn(norm(x)) + mlp(norm(x)), one norm (GPT-J, PaLM, Cohere); needs "pre"
    positions: str = "rope"  # "rope" | "alibi" | "xpos" | "learned" | "none"
    rope_theta: float = 10000.0
    rope_interleaved: bool = False  # rotate (x[2i], x[2i+1]) pairs (GPT-J, Cohere) rather than the two halves (Llama)
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", "factor": ..., ...} as in HF configs
    partial_rotary_factor: float = 1.0  # rotate only the first fraction of each head (Persimmon/Fuyu: 0.5)
    xpos_scale_base: float = 512.0
    max_seq_len: int = 2048
    qk_norm: str | None = None  # None | "rmsnorm" | "layernorm"
    qk_norm_per_head: bool = False  # one qk-norm weight (and bias) per head (Chameleon)
    qk_norm_eps: float | None = None  # None: norm_eps
    attn_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    logit_scale: float = 1.0  # logits multiplied by this (Cohere)
    embed_scale: bool = False  # multiply token embeddings by sqrt(dim) (Gemma)
    embed_norm: bool = False  # a norm over the (scaled) embeddings (torchscale/fairseq layernorm_embedding)
    init: str = "normal"  # "normal" (N(0, init_std)) | "magneto" (torchscale's sub-LN init, Wang et al. 2022)
    init_std: float = 0.02  # std of the "normal" init (HF initializer_range); tiny models learn faster near dim**-0.5
    dropout: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        _check_positive(self, "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                        "hidden_dim", "max_seq_len", "norm_eps", "qk_norm_eps", "init_std", "rope_theta",
                        "xpos_scale_base", "logit_scale")  # logit_scale 0: every logit 0, token 0 written
        _check_token_ids(self, self.vocab_size, "pad_token_id", "bos_token_id", "eos_token_id")
        _check_choice("mlp", self.mlp, ("swiglu", "geglu", "gelu", "relu2"))
        _check_choice("norm", self.norm, ("rmsnorm", "rmsnorm_gemma", "layernorm", "layernorm_nobias"))
        _check_choice("norm_placement", self.norm_placement, ("pre", "post", "sub", "swin"))
        if self.parallel_blocks and self.norm_placement != "pre":
            raise ConfigError(f"parallel_blocks needs norm_placement='pre', got {self.norm_placement!r}")
        _check_choice("positions", self.positions, ("rope", "alibi", "xpos", "learned", "none"))
        _check_choice("init", self.init, ("normal", "magneto"))
        _check_choice("qk_norm", self.qk_norm, (None, "rmsnorm", "layernorm"))
        if self.qk_norm_per_head and self.qk_norm != "layernorm":
            raise ConfigError(f"qk_norm_per_head needs qk_norm='layernorm', got qk_norm={self.qk_norm!r}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), "
                              "or give head_dim explicitly")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                              f"({self.kv_heads})")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.positions in ("rope", "xpos") and self.rotary_dim % 2:
            rotated = (f"head_dim, got {self.head_size}" if self.partial_rotary_factor == 1.0 else
                       f"rotated part, got head_dim {self.head_size} x partial_rotary_factor "
                       f"{self.partial_rotary_factor} = {self.rotary_dim}")
            raise ConfigError(f"{self.positions} needs an even {rotated}")
        if self.rope_scaling is not None:
            _check_choice("rope_scaling.rope_type", self.rope_scaling.get("rope_type"), ("linear", "llama3"))
            needed = {"linear": {"factor"}, "llama3": {"factor", "low_freq_factor", "high_freq_factor",
                                                      "original_max_position_embeddings"}}[self.rope_scaling["rope_type"]]
            if missing := sorted(needed - set(self.rope_scaling)):
                raise ConfigError(f"rope_scaling of type {self.rope_scaling['rope_type']!r} needs {missing}")
            for key in needed:
                check_number(f"rope_scaling.{key}", self.rope_scaling[key], above=0, error=ConfigError)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def rotary_dim(self) -> int:  # HF: int(head_dim * partial_rotary_factor)
        return int(self.head_size * self.partial_rotary_factor)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)


def estimate_parameters(config: Config) -> int:
    """A lower bound on a model's parameter count from its config's widths alone, allocating nothing: each
    (sub)config with `dim` and `n_layers` counts its attention and MLP matrices, its embeddings and its position
    tables."""
    total = sum(estimate_parameters(getattr(config, f.name)) for f in dataclasses.fields(config)
                if isinstance(getattr(config, f.name), Config))
    dim, layers = getattr(config, "dim", None), getattr(config, "n_layers", None)
    if isinstance(dim, int) and isinstance(layers, int):
        hidden = getattr(config, "hidden_dim", None) or 4 * dim
        heads = getattr(config, "n_heads", None) or 1
        head_dim = getattr(config, "head_dim", None) or dim // heads
        kv_heads = getattr(config, "n_kv_heads", None) or heads
        attention = dim * head_dim * (2 * heads + 2 * kv_heads)  # q, k, v and the output projection
        total += layers * (attention + 2 * dim * hidden) + (getattr(config, "vocab_size", None) or 0) * dim
        learned = config.max_seq_len if getattr(config, "positions", None) == "learned" else 0
        # position tables: a decoder's learned ones, a ViT's one per patch, an audio encoder's one per frame
        total += (learned + (getattr(config, "n_patches", 0) or 0) + (getattr(config, "n_positions", 0) or 0)) * dim
    return total


def check_fits_memory(config: Config, bytes_per_parameter: int = 4) -> None:
    """Refuses, before anything is allocated, a config whose weights alone would not fit in this machine's
    memory (float32 unless told otherwise)."""
    if torch.get_default_device().type == "meta":  # shapes only: nothing will be allocated
        return
    n = estimate_parameters(config)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if n * bytes_per_parameter > memory:
        raise ConfigError(f"{type(config).__name__} would have at least {n:.3g} parameters "
                          f"({n * bytes_per_parameter / 2**30:,.1f} GiB at {bytes_per_parameter} bytes each), more "
                          f"than this machine's {memory / 2**30:,.1f} GiB of memory; refusing before allocating")


def read_json_config(path: str | Path) -> dict[str, Any]:
    """A config.json (polymodal's or HF's) as a dict; ConfigError naming the file if it is not a JSON object."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: expected a JSON model config, got malformed JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings, got {type(data).__name__}")
    return data


__all__ = ["Config", "ConfigError", "DecoderConfig"]
