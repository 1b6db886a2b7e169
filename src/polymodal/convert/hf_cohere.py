"""Cohere (Command R; HF `CohereForCausalLM`) <-> polymodal's `Decoder` with parallel blocks: the config and key
map that the decoder family's `COHERE` (`families/decoder/convert.py`) reads.

Cohere is Llama's layout with one `input_layernorm` feeding attention and the MLP side by side (no
`post_attention_layernorm`), bias-free LayerNorms, interleaved rotary pairs and logits scaled by
`logit_scale`.
"""

from __future__ import annotations

from polymodal.config import ConfigError, DecoderConfig
from polymodal.convert.rules import decoder_config_from_hf, decoder_rules, rope_to_hf


def cohere_config_from_hf(hf: dict) -> DecoderConfig:
    if hf.get("use_qk_norm"):
        raise ConfigError("use_qk_norm=True (Command R+'s per-head LayerNorm on q and k) is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"Cohere's hidden_act must be 'silu', got {hf['hidden_act']!r}")
    base = decoder_config_from_hf(hf, gemma=False)  # sizes, rope, biases and token ids as Llama reads them
    return base.replace(norm="layernorm_nobias", norm_eps=hf.get("layer_norm_eps", 1e-5), parallel_blocks=True,
                        rope_interleaved=True, logit_scale=float(hf.get("logit_scale", 0.0625)),
                        tie_embeddings=hf.get("tie_word_embeddings", True))


def cohere_config_to_hf(cfg: DecoderConfig) -> dict:
    if not (cfg.parallel_blocks and cfg.norm == "layernorm_nobias" and cfg.rope_interleaved and cfg.mlp == "swiglu"
            and cfg.positions == "rope" and cfg.qk_norm is None and not cfg.mlp_bias):
        raise ConfigError("this decoder config has no Cohere equivalent (Cohere: parallel blocks, bias-free "
                          "LayerNorm, interleaved rotary, SwiGLU, no qk-norm, no MLP bias)")
    return {
        "architectures": ["CohereForCausalLM"], "model_type": "cohere",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
        "intermediate_size": cfg.hidden_dim, "hidden_act": "silu", "layer_norm_eps": cfg.norm_eps,
        "logit_scale": cfg.logit_scale, "rope_parameters": rope_to_hf(cfg), "max_position_embeddings": cfg.max_seq_len,
        "attention_bias": cfg.attn_bias, "use_qk_norm": False, "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
    }


def cohere_rules(cfg: DecoderConfig) -> list:
    """Llama's key map without the MLP's norm, which a parallel block does not have."""
    return [r for r in decoder_rules(cfg) if not r.ours.endswith("mlp_norm.weight")]

