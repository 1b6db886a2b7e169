"""Named configs: one explicit dict from preset name to a function returning the config."""

from __future__ import annotations

from typing import Callable

from polymodal.config import Config, DecoderConfig
from polymodal.encoders.vit import VisionConfig
from polymodal.models.paligemma import PaliGemmaConfig


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


def paligemma_tiny() -> PaliGemmaConfig:
    """32x32 images in 16 patches; small enough to learn the built-in world on a laptop CPU in minutes.
    The vocabulary's last id is the image placeholder (the trainer sizes it to its tokenizer)."""
    text = gemma_tiny().replace(dim=128, n_heads=4, n_kv_heads=1, head_dim=32, hidden_dim=384, n_layers=3)
    vision = VisionConfig(image_size=32, patch_size=8, dim=96, n_layers=3, n_heads=4, hidden_dim=256)
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=text.vocab_size - 1)


def paligemma_3b() -> PaliGemmaConfig:
    """PaliGemma 3B (224px): SigLIP So400m/14 + Gemma 2B."""
    vision = VisionConfig(image_size=224, patch_size=14, dim=1152, n_layers=27, n_heads=16, hidden_dim=4304,
                          pooling_head=False)
    return PaliGemmaConfig(vision=vision, text=gemma_2b().replace(vocab_size=257216), image_token_id=257152)


PRESETS: dict[str, Callable[[], Config]] = {
    "llama-tiny": llama_tiny,
    "gemma-tiny": gemma_tiny,
    "gemma-2b": gemma_2b,
    "llama-3.2-1b": llama_3_2_1b,
    "paligemma-tiny": paligemma_tiny,
    "paligemma-3b": paligemma_3b,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]()
