"""Named configs: one explicit dict from preset name to a function returning the config."""

from __future__ import annotations

from typing import Callable

from polymodal.errors import UnknownNameError
from polymodal.config import Config, DecoderConfig
from polymodal.encoders.vit import VisionConfig
from polymodal.families.chameleon.presets import chameleon_tiny
from polymodal.families.gemini.presets import gemini_nano_1, gemini_nano_2, gemini_tiny
from polymodal.families.kosmos.presets import kosmos_1, kosmos_tiny
from polymodal.families.paligemma.presets import paligemma_3b, paligemma_tiny, paligemma_world
from polymodal.models.contrastive import clip_tiny, clip_vit_l_14, siglip_so400m_14_224, siglip_tiny
from polymodal.fusion.perceiver import PerceiverConfig
from polymodal.models.flamingo import FlamingoConfig


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


def flamingo_tiny() -> FlamingoConfig:
    """32x32 images (CLIP-style: class token + 16 patches) resampled to 8 latents, videos of up to 4 frames,
    a gated cross-attention block before every 2nd of 4 LM blocks. `<image>` is the built-in tokenizer's id 4."""
    text = llama_tiny().replace(dim=128, n_layers=4, hidden_dim=352, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = VisionConfig(variant="clip", image_size=32, patch_size=8, dim=96, n_layers=3, n_heads=4, hidden_dim=256,
                          mlp="gelu", norm_eps=1e-5, pooling_head=False)
    perceiver = PerceiverConfig(depth=2, n_heads=4, head_dim=24, n_latents=8, max_frames=4)
    return FlamingoConfig(text=text, vision=vision, perceiver=perceiver, cross_attn_every=2, media_token_id=4)


def idefics_9b() -> FlamingoConfig:
    """HF Idefics 9B's shapes: LLaMA 7B + CLIP ViT-H/14 (exact GELU) + a 6-layer perceiver to 64 latents,
    cross-attention before every 4th layer. Its `<image>` id comes with its tokenizer: pass media_locations or
    set media_token_id."""
    text = DecoderConfig(vocab_size=32002, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=2048,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = VisionConfig(variant="clip", image_size=224, patch_size=14, dim=1280, n_layers=32, n_heads=16,
                          hidden_dim=5120, mlp="gelu", norm_eps=1e-5, pooling_head=False)
    perceiver = PerceiverConfig(depth=6, n_heads=16, head_dim=96, n_latents=64, hidden_dim=5120, mlp="relu")
    return FlamingoConfig(text=text, vision=vision, perceiver=perceiver, cross_attn_every=4, extra_vocab=2)


PRESETS: dict[str, Callable[[], Config]] = {
    "llama-tiny": llama_tiny,
    "gemma-tiny": gemma_tiny,
    "gemma-2b": gemma_2b,
    "gemma-7b": gemma_7b,
    "llama-3.2-1b": llama_3_2_1b,
    "paligemma-tiny": paligemma_tiny,
    "paligemma-world": paligemma_world,
    "paligemma-3b": paligemma_3b,
    "kosmos-tiny": kosmos_tiny,
    "kosmos-1": kosmos_1,
    "flamingo-tiny": flamingo_tiny,
    "idefics-9b": idefics_9b,
    "gemini-tiny": gemini_tiny,
    "gemini-nano-1": gemini_nano_1,
    "gemini-nano-2": gemini_nano_2,
    "clip-tiny": clip_tiny,
    "siglip-tiny": siglip_tiny,
    "clip-vit-l-14": clip_vit_l_14,
    "siglip-so400m-14-224": siglip_so400m_14_224,
    "chameleon-tiny": chameleon_tiny,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise UnknownNameError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]()
