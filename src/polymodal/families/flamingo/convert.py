"""HF `IdeficsForVisionText2Text` checkpoint directories <-> polymodal `Flamingo`.

Idefics (HuggingFaceM4, a Flamingo reproduction): a Llama LM with a gated cross-attention block before
every `cross_layer_interval`-th layer, an optional Perceiver Resampler (ReLU MLP, optional qk
LayerNorms), a CLIP vision tower whose last hidden state (class token included, no post-LayerNorm) is
the media features, and "decoupled" embeddings / LM head whose `additional_vocab_size` extra rows are
concatenated here into one vocabulary (split back on export).
"""

from __future__ import annotations

from pathlib import Path

from polymodal.config import ConfigError, DecoderConfig
from polymodal.convert.rules import (Family, Rule, decoder_rules, linear_rules, norm_rules, rope_from_hf,
                                    rope_to_hf)
from polymodal.convert.hf_vision import vision_config_from_hf, vision_config_to_hf, vision_rules
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.vit import VisionConfig
from polymodal.families.flamingo.config import FlamingoConfig
from polymodal.families.flamingo.model import Flamingo
from polymodal.fusion.perceiver import PerceiverConfig

ALPHA_TYPES = {"float": "scalar", "vector": "vector"}
# IdeficsVisionConfig's defaults (a CLIP layout with exact GELU); its width is `embed_dim`, not `hidden_size`
VISION_DEFAULTS = {"embed_dim": 768, "image_size": 224, "intermediate_size": 5120, "patch_size": 14,
                   "num_hidden_layers": 32, "num_attention_heads": 16, "num_channels": 3, "hidden_act": "gelu",
                   "layer_norm_eps": 1e-5}


def idefics_vision_from_hf(hf: dict) -> VisionConfig:
    vc = {**VISION_DEFAULTS, **hf}
    return vision_config_from_hf({**vc, "hidden_size": vc["embed_dim"]}, "clip")


def idefics_vision_to_hf(cfg: VisionConfig) -> dict:
    if cfg.variant != "clip":
        raise ConfigError(f"Idefics' vision tower is a CLIP ViT, got variant {cfg.variant!r}")
    hf = vision_config_to_hf(cfg)
    hf["embed_dim"] = hf.pop("hidden_size")
    hf["model_type"] = "idefics_vision"
    return hf


def config_from_hf(hf: dict) -> FlamingoConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"Idefics hidden_act {act!r} is not supported; supported: ['silu']")
    alpha_type = hf.get("alpha_type", "float")
    if alpha_type not in ALPHA_TYPES:
        raise ConfigError(f"Idefics alpha_type {alpha_type!r} is not supported; supported: {sorted(ALPHA_TYPES)}")
    n_layers, every = hf.get("num_hidden_layers", 32), hf.get("cross_layer_interval", 1)
    if n_layers % every:
        raise ConfigError(f"cross_layer_interval ({every}) must divide num_hidden_layers ({n_layers}); "
                          "HF Idefics cannot run such a config either")
    extra = hf.get("additional_vocab_size", 0)
    theta, scaling = rope_from_hf(hf)
    text = DecoderConfig(
        vocab_size=hf.get("vocab_size", 32000) + extra, dim=hf.get("hidden_size", 4096), n_layers=n_layers,
        n_heads=hf.get("num_attention_heads", 32), hidden_dim=hf.get("intermediate_size", 11008), mlp="swiglu",
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), positions="rope", rope_theta=theta,
        rope_scaling=scaling, max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=hf.get("tie_word_embeddings", False), dropout=float(hf.get("dropout", 0.0)),
        pad_token_id=hf.get("pad_token_id", 0), bos_token_id=hf.get("bos_token_id", 1),
        eos_token_id=hf.get("eos_token_id", 2),
    )
    vision = idefics_vision_from_hf(hf.get("vision_config") or {})
    perceiver = None
    if hf.get("use_resampler", False):
        p = hf.get("perceiver_config") or {}
        perceiver = PerceiverConfig(
            depth=p.get("resampler_depth", 6), n_heads=p.get("resampler_n_heads", 16),
            head_dim=p.get("resampler_head_dim", 96), n_latents=p.get("resampler_n_latents", 64),
            hidden_dim=4 * vision.dim, mlp="relu", qk_norm=p.get("qk_layer_norms_perceiver", False))
    return FlamingoConfig(text=text, vision=vision, perceiver=perceiver, cross_attn_every=every,
                          cross_attn_qk_norm=hf.get("qk_layer_norms", False), gate=ALPHA_TYPES[alpha_type],
                          extra_vocab=extra)


def config_to_hf(cfg: FlamingoConfig) -> dict:
    t = cfg.text
    if (t.mlp, t.norm, t.positions, t.kv_heads, t.head_size, t.attn_bias, t.mlp_bias, t.embed_scale) != (
            "swiglu", "rmsnorm", "rope", t.n_heads, t.dim // t.n_heads, False, False, False):
        raise ConfigError("this text config has no Idefics equivalent (Idefics is Llama with MHA and no biases)")
    if cfg.vision is None or cfg.xattn_heads != t.n_heads:
        raise ConfigError("Idefics needs a vision encoder and cross-attention with text.n_heads heads")
    p = cfg.perceiver
    if p is not None and (p.mlp != "relu" or p.max_media or p.max_frames or p.hidden_dim != 4 * cfg.feature_dim):
        raise ConfigError("Idefics' perceiver has a ReLU MLP of 4x width and no time embeddings")
    hf = {
        "architectures": ["IdeficsForVisionText2Text"], "model_type": "idefics",
        "vocab_size": t.vocab_size - cfg.extra_vocab, "additional_vocab_size": cfg.extra_vocab,
        "hidden_size": t.dim, "intermediate_size": t.hidden_dim, "num_hidden_layers": t.n_layers,
        "num_attention_heads": t.n_heads, "dropout": t.dropout, "hidden_act": "silu", "rms_norm_eps": t.norm_eps,
        "rope_parameters": rope_to_hf(t), "max_position_embeddings": t.max_seq_len,
        "tie_word_embeddings": t.tie_embeddings, "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id, "alpha_type": {v: k for k, v in ALPHA_TYPES.items()}[cfg.gate],
        "cross_layer_interval": cfg.cross_attn_every, "qk_layer_norms": cfg.cross_attn_qk_norm,
        "use_resampler": p is not None, "vision_config": idefics_vision_to_hf(cfg.vision),
    }
    if p is not None:
        hf["perceiver_config"] = {"use_resampler": True, "resampler_depth": p.depth, "resampler_n_heads": p.n_heads,
                                  "resampler_head_dim": p.head_dim, "resampler_n_latents": p.n_latents,
                                  "qk_layer_norms_perceiver": p.qk_norm}
    return hf


def rules(cfg: FlamingoConfig) -> list[Rule]:
    t, extra = cfg.text, cfg.extra_vocab
    base = t.vocab_size - extra
    out = [r for r in decoder_rules(t, ours="decoder.", theirs="model.")
           if r.ours not in ("decoder.tok_embeddings.weight", "decoder.output.weight")]
    split = (base, extra) if extra else None
    out.append(Rule("decoder.tok_embeddings.weight", ("model.embed_tokens.weight",)
                    + (("model.embed_tokens.additional_embedding.weight",) if extra else ()), split))
    if not t.tie_embeddings:
        out.append(Rule("decoder.output.weight",
                        ("lm_head.weight",) + (("lm_head.additional_fc.weight",) if extra else ()), split))
    q = t.n_heads * t.head_size
    for j in range(cfg.n_cross_layers):
        o, h = f"cross_layers.{j}.", f"model.gated_cross_attn_layers.{j}."
        out += linear_rules(f"{o}attn.wq", [f"{h}cross_attn.q_proj"], None, False)
        out += linear_rules(f"{o}attn.wkv", [f"{h}cross_attn.k_proj", f"{h}cross_attn.v_proj"], [q, q], False)
        out += linear_rules(f"{o}attn.wo", [f"{h}cross_attn.o_proj"], None, False)
        out += linear_rules(f"{o}mlp.w_in", [f"{h}mlp.gate_proj", f"{h}mlp.up_proj"], [t.hidden_dim] * 2, False)
        out += linear_rules(f"{o}mlp.w_out", [f"{h}mlp.down_proj"], None, False)
        out += [Rule(f"{o}attn_norm.weight", (f"{h}input_layernorm.weight",)),
                Rule(f"{o}mlp_norm.weight", (f"{h}post_attention_layernorm.weight",)),
                Rule(f"{o}attn_gate", (f"{h}alpha_cross_attn",)), Rule(f"{o}mlp_gate", (f"{h}alpha_dense",))]
        if cfg.cross_attn_qk_norm:
            out += [Rule(f"{o}attn.q_norm.weight", (f"{h}cross_attn.q_layer_norm.weight",)),
                    Rule(f"{o}attn.k_norm.weight", (f"{h}cross_attn.k_layer_norm.weight",))]
    if cfg.perceiver is not None:
        out += perceiver_rules(cfg.perceiver, "perceiver.", "model.perceiver_resampler.")
    return out + vision_rules(cfg.vision, "vision.", "model.vision_model.")


def perceiver_rules(p: PerceiverConfig, ours: str, theirs: str) -> list[Rule]:
    inner = p.n_heads * p.head_dim
    out = [Rule(f"{ours}latents", (f"{theirs}latents",)), *norm_rules(f"{ours}norm", f"{theirs}layer_norm")]
    for d in range(p.depth):
        o, a, m = f"{ours}layers.{d}.", f"{theirs}blocks.{d}.0.", f"{theirs}blocks.{d}.1."
        out += norm_rules(f"{o}media_norm", f"{a}context_layer_norm")
        out += norm_rules(f"{o}latent_norm", f"{a}latents_layer_norm")
        out += linear_rules(f"{o}attn.wq", [f"{a}q_proj"], None, False)
        out += linear_rules(f"{o}attn.wkv", [f"{a}k_proj", f"{a}v_proj"], [inner, inner], False)
        out += linear_rules(f"{o}attn.wo", [f"{a}output_proj"], None, False)
        if p.qk_norm:
            out += norm_rules(f"{o}attn.q_norm", f"{a}q_layer_norm") + norm_rules(f"{o}attn.k_norm", f"{a}k_layer_norm")
        out += norm_rules(f"{o}mlp_norm", f"{m}ln")
        out += linear_rules(f"{o}mlp.w_in", [f"{m}fc"], None, False)
        out += linear_rules(f"{o}mlp.w_out", [f"{m}c_proj"], None, False)
    return out


def media_token_from_tokenizer(cfg: FlamingoConfig, directory: Path) -> FlamingoConfig:
    """Idefics marks images with `<image>`, whose id HF keeps in the tokenizer (its processor reads it
    there), not in config.json: taken from the directory's tokenizer when it has one."""
    try:
        return cfg.replace(media_token_id=Tokenizer.from_file(directory).token_id("<image>"))
    except (FileNotFoundError, KeyError):
        return cfg


IDEFICS = Family(config_from_hf=config_from_hf, build=Flamingo, rules=rules, config_to_hf=config_to_hf,
                 ignore=("rotary_emb.inv_freq",), from_directory=media_token_from_tokenizer)
