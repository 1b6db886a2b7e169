"""Chameleon presets: the tiny model of tests and the built-in world (HF checkpoints load through `convert.py`)."""

from __future__ import annotations

from polymodal.config import DecoderConfig
from polymodal.encoders.vq import VQConfig
from polymodal.families.chameleon.config import ChameleonConfig


def chameleon_tiny() -> ChameleonConfig:
    """For tests and the built-in world: 32x32 images as 8x8 = 64 codes of a 128-entry codebook, held
    by the last 128 of 512 tokens; `<image>`, `<img>`, `</img>` are the built-in tokenizer's ids 4, 6, 7.
    Its VQ uses GroupNorm with 8 groups for speed; HF's Chameleon VQ fixes 32, so export needs norm_groups=32."""
    text = DecoderConfig(vocab_size=512, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=384,
                         qk_norm="layernorm", qk_norm_per_head=True, norm_eps=1e-5, max_seq_len=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vq = VQConfig(resolution=32, base_channels=16, channel_multiplier=[1, 2, 2], num_res_blocks=1, mid_attn=False,
                  latent_channels=32, embed_dim=32, num_embeddings=128, norm_groups=8)
    return ChameleonConfig(text=text, vq=vq, image_tokens=384, image_token_id=4, begin_image_id=6, end_image_id=7)


PRESETS = {"chameleon-tiny": chameleon_tiny}
