"""Named CLIP / SigLIP configs: tiny ones for tests, and the shapes of released checkpoints."""

from __future__ import annotations

import math

from polymodal.encoders.text import TextConfig
from polymodal.encoders.vit import VisionConfig
from polymodal.families.contrastive.config import ContrastiveConfig


def clip_tiny() -> ContrastiveConfig:
    """32x32 images, 64-wide towers; ids 0-2 are <pad> <bos> <eos> as in polymodal's tokenizer."""
    vision = VisionConfig(variant="clip", image_size=32, patch_size=8, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                          mlp="quick_gelu", norm_eps=1e-5, pooling_head=False)
    text = TextConfig(variant="clip", vocab_size=512, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=32,
                      mlp="quick_gelu", norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return ContrastiveConfig(vision=vision, text=text, projection_dim=64, loss="softmax")


def siglip_tiny() -> ContrastiveConfig:
    vision = VisionConfig(image_size=32, patch_size=8, dim=64, n_layers=2, n_heads=4, hidden_dim=128)
    text = TextConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=32,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return ContrastiveConfig(vision=vision, text=text, loss="sigmoid", logit_scale_init=math.log(10.0))


def siglip_so400m_14_224() -> ContrastiveConfig:
    """google/siglip-so400m-patch14-224 (16 text tokens, as big_vision trained it at 224 px)."""
    vision = VisionConfig(image_size=224, patch_size=14, dim=1152, n_layers=27, n_heads=16, hidden_dim=4304)
    text = TextConfig(vocab_size=32000, dim=1152, n_layers=27, n_heads=16, hidden_dim=4304, max_seq_len=16,
                      pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
    return ContrastiveConfig(vision=vision, text=text, loss="sigmoid", logit_scale_init=math.log(10.0))


def clip_vit_l_14() -> ContrastiveConfig:
    """openai/clip-vit-large-patch14."""
    vision = VisionConfig(variant="clip", image_size=224, patch_size=14, dim=1024, n_layers=24, n_heads=16,
                          hidden_dim=4096, mlp="quick_gelu", norm_eps=1e-5, pooling_head=False)
    text = TextConfig(variant="clip", vocab_size=49408, dim=768, n_layers=12, n_heads=12, hidden_dim=3072,
                      max_seq_len=77, mlp="quick_gelu", norm_eps=1e-5, pad_token_id=1, bos_token_id=49406,
                      eos_token_id=49407)
    return ContrastiveConfig(vision=vision, text=text, projection_dim=768, loss="softmax")


PRESETS = {
    "clip-tiny": clip_tiny,
    "siglip-tiny": siglip_tiny,
    "clip-vit-l-14": clip_vit_l_14,
    "siglip-so400m-14-224": siglip_so400m_14_224,
}
