"""Named configs: one explicit dict from preset name to a function returning the config."""

from __future__ import annotations

from typing import Callable

from polymodal.config import Config, DecoderConfig


def llama_tiny() -> DecoderConfig:
    return DecoderConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176,
                         max_seq_len=512)


def gemma_tiny() -> DecoderConfig:
    return DecoderConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=32, hidden_dim=128,
                         mlp="geglu", norm="rmsnorm_gemma", tie_embeddings=True, embed_scale=True, max_seq_len=512)


def gemma_2b() -> DecoderConfig:
    return DecoderConfig(vocab_size=256000, dim=2048, n_layers=18, n_heads=8, n_kv_heads=1, head_dim=256,
                         hidden_dim=16384, mlp="geglu", norm="rmsnorm_gemma", tie_embeddings=True, embed_scale=True,
                         max_seq_len=8192, pad_token_id=0, bos_token_id=2, eos_token_id=1)


def llama_3_2_1b() -> DecoderConfig:
    return DecoderConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                         rope_theta=500000.0, max_seq_len=131072, norm_eps=1e-5, tie_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         bos_token_id=128000, eos_token_id=128001)


PRESETS: dict[str, Callable[[], Config]] = {
    "llama-tiny": llama_tiny,
    "gemma-tiny": gemma_tiny,
    "gemma-2b": gemma_2b,
    "llama-3.2-1b": llama_3_2_1b,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]()
