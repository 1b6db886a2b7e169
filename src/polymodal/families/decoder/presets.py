"""Named text decoder configs: tiny ones for tests, and the shapes of released Llama / Gemma checkpoints."""

from __future__ import annotations

from polymodal.config import DecoderConfig


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


def gemma_7b() -> DecoderConfig:
    """Gemma 7B as the PaliGemma notes print its module tree: 28 layers, width 3072, 16 heads of 256 (MHA),
    GeGLU MLP 24576, vocabulary 256000, tied head."""
    return gemma_2b().replace(dim=3072, n_layers=28, n_heads=16, n_kv_heads=16, head_dim=256, hidden_dim=24576)


def llama_3_2_1b() -> DecoderConfig:
    return DecoderConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                         rope_theta=500000.0, max_seq_len=131072, norm_eps=1e-5, tie_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         bos_token_id=128000, eos_token_id=128001)


PRESETS = {
    "llama-tiny": llama_tiny,
    "gemma-tiny": gemma_tiny,
    "gemma-2b": gemma_2b,
    "gemma-7b": gemma_7b,
    "llama-3.2-1b": llama_3_2_1b,
}
