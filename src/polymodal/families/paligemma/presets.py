"""Named PaliGemma configs."""

from __future__ import annotations

from polymodal.encoders.vit import VisionConfig
from polymodal.families.decoder.presets import gemma_2b, gemma_tiny
from polymodal.fusion.configs import PaliGemmaConfig


def paligemma_tiny() -> PaliGemmaConfig:
    """32x32 images in 16 patches; small enough to learn the built-in world on a laptop CPU in minutes.
    The image placeholder is the vocabulary's last id, whatever the tokenizer; a trainer puts its
    tokenizer's vocabulary size and `<image>` id in instead (`data.formats.PaliGemmaFormat.fit`)."""
    text = gemma_tiny().replace(dim=128, n_heads=4, n_kv_heads=1, head_dim=32, hidden_dim=384, n_layers=3)
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
    return PaliGemmaConfig(vision=vision, text=gemma_2b().replace(vocab_size=257216), image_token_id=257152)


PRESETS = {
    "paligemma-tiny": paligemma_tiny,
    "paligemma-world": paligemma_world,
    "paligemma-3b": paligemma_3b,
}
