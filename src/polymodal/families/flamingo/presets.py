"""Named Flamingo configs: a tiny one for tests and the built-in world, a tiny FlamingoPaLM, and HF Idefics 9B's
shapes."""

from __future__ import annotations

from polymodal.config import DecoderConfig
from polymodal.encoders.vit import VisionConfig
from polymodal.families.flamingo.config import FlamingoConfig
from polymodal.fusion.perceiver import PerceiverConfig


def flamingo_tiny() -> FlamingoConfig:
    """32x32 images (CLIP-style: class token + 16 patches) resampled to 8 latents, videos of up to 4 frames,
    a gated cross-attention block before every 2nd of 4 LM blocks. `<image>` is the built-in tokenizer's id 4."""
    text = DecoderConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352, max_seq_len=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)  # a llama-tiny, wider and deeper
    vision = VisionConfig(variant="clip", image_size=32, patch_size=8, dim=96, n_layers=3, n_heads=4, hidden_dim=256,
                          mlp="gelu", norm_eps=1e-5, pooling_head=False)
    perceiver = PerceiverConfig(depth=2, n_heads=4, head_dim=24, n_latents=8, max_frames=4)
    return FlamingoConfig(text=text, vision=vision, perceiver=perceiver, cross_attn_every=2, media_token_id=4)


def flamingo_palm() -> FlamingoConfig:
    """flamingo-tiny's media path over a PaLM-style LM, as flamingo-pytorch's `flamingo_palm.py` builds it:
    parallel blocks (one bias-free LayerNorm feeding attention and a SwiGLU feed-forward four times as wide,
    both added to the residual), multi-query attention (one K/V head), rotary positions, a tied output
    embedding, and a gated cross-attention block every 3rd of 6 layers."""
    tiny = flamingo_tiny()
    text = tiny.text.replace(n_layers=6, n_kv_heads=1, hidden_dim=4 * tiny.text.dim, norm="layernorm_nobias",
                             parallel_blocks=True, tie_embeddings=True)
    return tiny.replace(text=text, cross_attn_every=3)


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


PRESETS = {
    "flamingo-tiny": flamingo_tiny,
    "flamingo-palm": flamingo_palm,
    "idefics-9b": idefics_9b,
}
