"""HF Fuyu checkpoints (`FuyuForCausalLM`: patches straight into a Persimmon decoder) <-> a `Gemini` model
without modality tokens.

One layout differs from ours beyond names: Persimmon fuses q, k, v per head ((head, qkv, hs) rows, ours are
(qkv, head, hs)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polymodal.config import ConfigError, DecoderConfig
from polymodal.convert.rules import Family, Rule, linear_rules, norm_rules, rope_from_hf
from polymodal.families.gemini.config import GeminiConfig, MediaTokens
from polymodal.families.gemini.model import Gemini


@dataclass(frozen=True)
class HeadInterleavedQKV(Rule):
    """ours (3 * nh * hs, ...) rows (qkv, head, hs) <- theirs[0] rows (head, qkv, hs) (Persimmon, NeoX)."""

    n_heads: int = 0

    def gather(self, hf: dict[str, torch.Tensor]) -> torch.Tensor:
        t = super().gather(hf)
        return t.unflatten(0, (self.n_heads, 3, -1)).transpose(0, 1).flatten(0, 2)

    def split(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.theirs[0]: tensor.unflatten(0, (3, self.n_heads, -1)).transpose(0, 1).flatten(0, 2)}


def fuyu_config_from_hf(hf: dict) -> GeminiConfig:
    text = hf.get("text_config") or hf  # transformers 5 nests the Persimmon config; hub files are flat
    act = text.get("hidden_act", "relu2")
    if act not in ("relu2", "gelu"):
        raise ConfigError(f"Persimmon hidden_act {act!r} is not supported; supported: ['relu2', 'gelu']")
    theta, scaling = rope_from_hf(text)
    rope = text.get("rope_parameters") or {}
    decoder = DecoderConfig(
        vocab_size=text["vocab_size"], dim=text["hidden_size"], n_layers=text["num_hidden_layers"],
        n_heads=text["num_attention_heads"], hidden_dim=text["intermediate_size"], mlp=act,
        norm="layernorm", norm_eps=text.get("layer_norm_eps", 1e-5), positions="rope", rope_theta=theta,
        rope_scaling=scaling, partial_rotary_factor=rope.get("partial_rotary_factor",
                                                             text.get("partial_rotary_factor", 0.5)),
        max_seq_len=text.get("max_position_embeddings", 16384),
        qk_norm="layernorm" if text.get("qk_layernorm", True) else None, attn_bias=True, mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", False), pad_token_id=text.get("pad_token_id"),
        bos_token_id=text.get("bos_token_id", 1), eos_token_id=text.get("eos_token_id", 2),
    )
    return GeminiConfig(text=decoder, tokens=MediaTokens(placeholder=hf["image_token_id"], image=None, audio=None,
                                                         video=None),
                        image_size=hf.get("image_size", 300), patch_size=hf.get("patch_size", 30),
                        channels=hf.get("num_channels", 3))


def fuyu_config_to_hf(cfg: GeminiConfig) -> dict:
    t = cfg.text
    fuyu_like = (cfg.vision is None and cfg.audio_tower is None and not cfg.max_frames and not cfg.tokens.wrapped
                 and not cfg.modal_norm and t.mlp in ("relu2", "gelu") and t.norm == "layernorm"
                 and t.norm_placement == "pre" and t.positions == "rope" and t.kv_heads == t.n_heads
                 and t.head_size * t.n_heads == t.dim and t.attn_bias and t.mlp_bias and not t.embed_scale
                 and not t.embed_norm and t.qk_norm in (None, "layernorm") and not t.qk_norm_per_head)
    if not fuyu_like:
        raise ConfigError("this Gemini config has no Fuyu equivalent (Fuyu: linear patches, no modality tokens, "
                          "a Persimmon decoder: LayerNorm, MHA, biases, RoPE)")
    rope = {"rope_type": "default", "rope_theta": t.rope_theta, "partial_rotary_factor": t.partial_rotary_factor,
            **(t.rope_scaling or {})}
    return {
        "architectures": ["FuyuForCausalLM"], "model_type": "fuyu", "image_size": cfg.image_size,
        "patch_size": cfg.patch_size, "num_channels": cfg.channels, "image_token_id": cfg.tokens.placeholder,
        "tie_word_embeddings": t.tie_embeddings,
        "text_config": {
            "model_type": "persimmon", "vocab_size": t.vocab_size, "hidden_size": t.dim,
            "intermediate_size": t.hidden_dim, "num_hidden_layers": t.n_layers, "num_attention_heads": t.n_heads,
            "hidden_act": t.mlp, "max_position_embeddings": t.max_seq_len, "layer_norm_eps": t.norm_eps,
            "qk_layernorm": t.qk_norm == "layernorm", "rope_parameters": rope, "tie_word_embeddings": t.tie_embeddings,
            "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
        },
    }


def fuyu_rules(cfg: GeminiConfig) -> list[Rule]:
    t, lm = cfg.text, "language_model.model."
    rules = [Rule("decoder.tok_embeddings.weight", (f"{lm}embed_tokens.weight",)),
             *norm_rules("decoder.norm", f"{lm}final_layernorm"),
             *linear_rules("image_proj", ["vision_embed_tokens"], None, True)]
    for i in range(t.n_layers):
        o, h = f"decoder.layers.{i}.", f"{lm}layers.{i}."
        rules += [HeadInterleavedQKV(f"{o}attn.wqkv.{p}", (f"{h}self_attn.query_key_value.{p}",), n_heads=t.n_heads)
                  for p in ("weight", "bias")]
        rules += linear_rules(f"{o}attn.wo", [f"{h}self_attn.dense"], None, True)
        rules += linear_rules(f"{o}mlp.w_in", [f"{h}mlp.dense_h_to_4h"], None, True)
        rules += linear_rules(f"{o}mlp.w_out", [f"{h}mlp.dense_4h_to_h"], None, True)
        rules += norm_rules(f"{o}attn_norm", f"{h}input_layernorm")
        rules += norm_rules(f"{o}mlp_norm", f"{h}post_attention_layernorm")
        if t.qk_norm:
            rules += norm_rules(f"{o}attn.q_norm", f"{h}self_attn.q_layernorm")
            rules += norm_rules(f"{o}attn.k_norm", f"{h}self_attn.k_layernorm")
    if not t.tie_embeddings:
        rules.append(Rule("decoder.output.weight", ("language_model.lm_head.weight",)))
    return rules


FUYU = Family(
    config_from_hf=fuyu_config_from_hf, build=Gemini, rules=fuyu_rules, config_to_hf=fuyu_config_to_hf,
    # checkpoints keep the original layout; transformers 5 modules name it differently in memory
    aliases=(("model.language_model.", "language_model.model."), ("model.vision_embed_tokens.", "vision_embed_tokens."),
             ("lm_head.", "language_model.lm_head.")),
)
