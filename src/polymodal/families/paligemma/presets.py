"""PaliGemma presets: the tiny models of tests and of `polymodal train` (the main job), and PaliGemma 3B."""

from __future__ import annotations

from polymodal.config import DecoderConfig
from polymodal.encoders.vit import VisionConfig
from polymodal.families.paligemma.config import PaliGemmaConfig

GEMMA = dict(mlp="geglu", norm="rmsnorm_gemma", tie_embeddings=True, embed_scale=True)  # Gemma's decoder choices


def paligemma_tiny() -> PaliGemmaConfig:
    """32x32 images in 16 patches; small enough to learn the built-in world on a laptop CPU in minutes.
    The image placeholder is the vocabulary's last id, whatever the tokenizer; a trainer puts its
    tokenizer's vocabulary size and `<image>` id in instead (`PaliGemmaFormat.fit`)."""
    text = DecoderConfig(vocab_size=512, dim=128, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=32, hidden_dim=384,
                         max_seq_len=512, **GEMMA)
    vision = VisionConfig(image_size=32, patch_size=8, dim=96, n_layers=3, n_heads=4, hidden_dim=256,
                          pooling_head=False)  # PaliGemma reads the patch features; a MAP head would go unused
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=text.vocab_size - 1)


def paligemma_world() -> PaliGemmaConfig:
    """paligemma-tiny with its decoder initialised at N(0, dim**-0.5), which breaks through to reading the
    image several times sooner than N(0, 0.02): the model of `polymodal train` (the main job)."""
    cfg = paligemma_tiny()
    return cfg.replace(text=cfg.text.replace(init_std=cfg.text.dim ** -0.5))


def paligemma_3b() -> PaliGemmaConfig:
    """PaliGemma 3B (224px): SigLIP So400m/14 + Gemma 2B."""
    vision = VisionConfig(image_size=224, patch_size=14, dim=1152, n_layers=27, n_heads=16, hidden_dim=4304,
                          pooling_head=False)
    text = DecoderConfig(vocab_size=257216, dim=2048, n_layers=18, n_heads=8, n_kv_heads=1, head_dim=256,
                         hidden_dim=16384, max_seq_len=8192, pad_token_id=0, bos_token_id=2, eos_token_id=1, **GEMMA)
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=257152)


def paligemma_3b_448() -> PaliGemmaConfig:
    """PaliGemma 3B at 448x448: 1,024 image tokens (its text context holds them and a prompt)."""
    cfg = paligemma_3b()
    return cfg.replace(vision=cfg.vision.replace(image_size=448))


def paligemma_3b_896() -> PaliGemmaConfig:
    """PaliGemma 3B at 896x896: 4,096 image tokens."""
    cfg = paligemma_3b()
    return cfg.replace(vision=cfg.vision.replace(image_size=896))


PRESETS = {"paligemma-tiny": paligemma_tiny, "paligemma-world": paligemma_world, "paligemma-3b": paligemma_3b,
           "paligemma-3b-448": paligemma_3b_448, "paligemma-3b-896": paligemma_3b_896}
