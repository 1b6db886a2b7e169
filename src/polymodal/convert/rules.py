"""The pieces every HF key map is made of: `Rule`s, the `Family` record, and the Llama / Gemma decoder layout
that every family holding such a decoder reuses.

A key map is a list of `Rule`s: one polymodal tensor made of one or more HF tensors concatenated
along dim 0 (fused QKV, fused gate/up). Import concatenates, export splits, so a round trip
HF -> polymodal -> HF gives back the same tensors. Each family's own map is in its folder
(`families/<name>/convert.py`), named in its spec's `hf`; `convert.hf.FAMILIES` is their union.
This module sits below the families (tests/test_imports.py), so it imports no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from polymodal.config import ConfigError, DecoderConfig
from polymodal.errors import CheckpointError


@dataclass(frozen=True)
class Rule:
    """ours = cat(theirs) along dim 0; or, with `rows`, ours = theirs[0][start:end] (one HF tensor
    feeding several of ours, e.g. nn.MultiheadAttention's in_proj_weight)."""

    ours: str
    theirs: tuple[str, ...]
    sizes: tuple[int, ...] | None = None  # dim-0 sizes of `theirs`, to split on export
    rows: tuple[int, int] | None = None

    def check(self, available) -> None:
        missing = [k for k in self.theirs if k not in available]
        if missing:
            raise CheckpointError(f"checkpoint is missing {missing} (needed for {self.ours})")

    def gather(self, hf: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check(hf)
        parts = [hf[k] for k in self.theirs]
        if self.rows is not None:
            return parts[0][self.rows[0]:self.rows[1]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        """The shape `gather` gives, from the shapes of `theirs`."""
        first = shapes[self.theirs[0]]
        if self.rows is not None:
            return (max(0, min(self.rows[1], first[0]) - self.rows[0]), *first[1:])
        if len(self.theirs) == 1:
            return first
        return (sum(shapes[k][0] for k in self.theirs), *first[1:])

    def joins(self) -> bool:
        """ours is theirs laid end to end along dim 0 (one of them: ours is it), nothing else done to them."""
        return type(self).gather is Rule.gather and self.rows is None

    def load(self, parts: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """`gather(parts)` in `dtype` on `device`; a concatenation copies each part straight into its rows,
        cast on the way (no joined copy in the stored dtype first)."""
        if not self.joins() or len(parts) == 1:
            return self.gather(parts).to(device=device, dtype=dtype)
        self.check(parts)
        value = torch.empty(self.shape({k: p.shape for k, p in parts.items()}), dtype=dtype, device=device)
        row = 0
        for key in self.theirs:
            value[row:row + len(parts[key])].copy_(parts[key])
            row += len(parts[key])
        return value

    def split(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(self.theirs) == 1:
            return {self.theirs[0]: tensor}
        return dict(zip(self.theirs, tensor.split(list(self.sizes), dim=0)))


def export_state(rules: list[Rule], ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the rules: split fused tensors, re-join row slices in row order."""
    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for rule in rules:
        if rule.rows is None:
            out.update(rule.split(ours[rule.ours]))
        else:
            pieces.setdefault(rule.theirs[0], []).append((rule.rows[0], ours[rule.ours]))
    for key, parts in pieces.items():
        out[key] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], dim=0)
    return out


@dataclass(frozen=True)
class Family:
    """How to read one HF model_type: its config, its model, its key map, and the way back."""

    config_from_hf: Callable[[dict], object]
    build: Callable[[object], nn.Module]
    rules: Callable[[object], list[Rule]]
    config_to_hf: Callable[[object], dict]
    ignore: tuple[str, ...] = ()  # HF tensors with no polymodal counterpart (e.g. rotary caches)
    aliases: tuple[tuple[str, str], ...] = ()  # (old prefix, canonical prefix) for other HF key layouts
    skip: tuple[str, ...] = ()  # key prefixes of parts not built (Whisper's text decoder, reading its encoder)
    from_directory: Callable[[object, Path], object] | None = None  # config fields HF keeps outside config.json
    tied_head: Callable[[object], tuple[str, str] | None] | None = None  # (head, embeddings) keys when tied

    def canonical(self, key: str) -> str:
        """The name a key map uses for a checkpoint key of any of the HF layouts it reads."""
        for old, new in self.aliases:
            if key.startswith(old):
                return new + key[len(old):]
        return key


def linear_rules(ours: str, theirs: list[str], sizes: list[int] | None, bias: bool) -> list[Rule]:
    rules = [Rule(f"{ours}.weight", tuple(f"{t}.weight" for t in theirs), tuple(sizes) if sizes else None)]
    if bias:
        rules.append(Rule(f"{ours}.bias", tuple(f"{t}.bias" for t in theirs), tuple(sizes) if sizes else None))
    return rules


def norm_rules(ours: str, theirs: str) -> list[Rule]:
    """A LayerNorm's weight and bias."""
    return linear_rules(ours, [theirs], None, True)


def decoder_rules(cfg: DecoderConfig, ours: str = "", theirs: str = "model.", lm_head: str = "lm_head") -> list[Rule]:
    """Llama/Gemma layout: `model.layers.i.self_attn.q_proj`, `mlp.gate_proj`, ..."""
    q, kv, hid = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size, cfg.hidden_dim
    rules = [Rule(f"{ours}tok_embeddings.weight", (f"{theirs}embed_tokens.weight",)),
             Rule(f"{ours}norm.weight", (f"{theirs}norm.weight",))]
    for i in range(cfg.n_layers):
        o, t = f"{ours}layers.{i}.", f"{theirs}layers.{i}."
        rules += linear_rules(f"{o}attn.wqkv", [f"{t}self_attn.{p}_proj" for p in "qkv"], [q, kv, kv], cfg.attn_bias)
        rules += linear_rules(f"{o}attn.wo", [f"{t}self_attn.o_proj"], None, cfg.attn_bias)
        rules += linear_rules(f"{o}mlp.w_in", [f"{t}mlp.gate_proj", f"{t}mlp.up_proj"], [hid, hid], cfg.mlp_bias)
        rules += linear_rules(f"{o}mlp.w_out", [f"{t}mlp.down_proj"], None, cfg.mlp_bias)
        rules += [Rule(f"{o}attn_norm.weight", (f"{t}input_layernorm.weight",)),
                  Rule(f"{o}mlp_norm.weight", (f"{t}post_attention_layernorm.weight",))]
    if not cfg.tie_embeddings:
        rules.append(Rule(f"{ours}output.weight", (f"{lm_head}.weight",)))
    return rules


ROPE_KEYS = {"linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4.x)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_KEYS:
        raise ConfigError(f"rope_type {rope_type!r} is not supported; supported: {['default', *ROPE_KEYS]}")
    return theta, {"rope_type": rope_type, **{k: params[k] for k in ROPE_KEYS[rope_type]}}


def rope_to_hf(cfg: DecoderConfig) -> dict:
    return {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}


MLP_FROM_HF_ACT = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}


def decoder_config_from_hf(hf: dict, *, gemma: bool) -> DecoderConfig:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if gemma and act == "gelu":  # the first Gemma releases' config value, meant (and read by HF) as tanh-GELU
        act = "gelu_pytorch_tanh"
    if act not in MLP_FROM_HF_ACT:
        raise ConfigError(f"hidden activation {act!r} is not supported; supported: {sorted(MLP_FROM_HF_ACT)}")
    theta, scaling = rope_from_hf(hf)
    return DecoderConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"), hidden_dim=hf["intermediate_size"], mlp=MLP_FROM_HF_ACT[act],
        norm="rmsnorm_gemma" if gemma else "rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        positions="rope", rope_theta=theta, rope_scaling=scaling, max_seq_len=hf.get("max_position_embeddings", 2048),
        attn_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", gemma), embed_scale=gemma,
        pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
    )


def decoder_config_to_hf(cfg: DecoderConfig, *, gemma: bool) -> dict:
    act = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}.get(cfg.mlp)
    if act is None or cfg.norm != ("rmsnorm_gemma" if gemma else "rmsnorm") or cfg.positions != "rope":
        raise ConfigError(f"this decoder config has no {'Gemma' if gemma else 'Llama'} equivalent")
    hf = {
        "architectures": ["GemmaForCausalLM" if gemma else "LlamaForCausalLM"],
        "model_type": "gemma" if gemma else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
        "intermediate_size": cfg.hidden_dim, "hidden_act": act, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope_to_hf(cfg),
        "max_position_embeddings": cfg.max_seq_len, "attention_bias": cfg.attn_bias,
        "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
    }
    if not gemma:
        hf["mlp_bias"] = cfg.mlp_bias
    return hf


def tied_head(head: str, embeddings: str, text: Callable[[object], DecoderConfig] = lambda cfg: cfg):
    """A `Family.tied_head`: the keys of an output head tied to the input embeddings, when the config ties them."""
    return lambda cfg: (head, embeddings) if text(cfg).tie_embeddings else None


def causal_lm_config_from_hf(hf: dict, *, gemma: bool) -> DecoderConfig:
    """A Llama / Gemma causal LM's config (PaliGemma's text_config says bidirectional for its own prefix mask)."""
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=True (an encoder-style Gemma) is not supported: "
                          "this decoder is causal")
    return decoder_config_from_hf(hf, gemma=gemma)

