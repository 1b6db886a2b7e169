"""Gemini presets: the tiny model of tests and the built-in world, and Gemini Nano-1 / Nano-2's assumed shapes."""

from __future__ import annotations

from polymodal.config import DecoderConfig
from polymodal.encoders.audio import AudioConfig
from polymodal.encoders.conformer import ConformerConfig
from polymodal.encoders.vq import VQConfig
from polymodal.families.gemini.config import GeminiConfig, MediaTokens
from polymodal.families.gemini.format import place_codes


def gemini_tiny() -> GeminiConfig:
    """For tests and the built-in world, hearing through the Whisper-style encoder: 32x32 images as 16
    linear-embedded patches with learned patch positions, 1 s audio clips (80 mels, 50 encoder frames pooled
    to 25 tokens), videos of up to 4 frames (64 tokens); a GQA, qk-norm decoder initialised at N(0, dim**-0.5)
    (as paligemma-world: it learns to read media sooner). It writes 32x32 images as 8x8 codes of a 128-entry
    VQ codebook (chameleon-tiny's VQ), held by the last 128 tokens, after their begin and end tokens (382, 383:
    `place_codes`, as `GeminiFormat.fit` puts them after a tokenizer's vocabulary). Media token ids are the
    built-in tokenizer's."""
    dim = 128
    text = DecoderConfig(vocab_size=512, dim=dim, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=384,
                         qk_norm="rmsnorm", max_seq_len=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         init_std=dim ** -0.5)
    audio = AudioConfig(n_mels=80, n_positions=50, dim=64, n_layers=2, n_heads=4, hidden_dim=128)
    vq = VQConfig(resolution=32, base_channels=16, channel_multiplier=[1, 2, 2], num_res_blocks=1, mid_attn=False,
                  latent_channels=32, embed_dim=32, num_embeddings=128, norm_groups=8)
    reads = GeminiConfig(text=text, image_size=32, patch_size=8, patch_positions=True, audio=audio, audio_pool=2,
                         max_frames=4)
    return place_codes(reads, vq, 382)


def gemini_tiny_usm() -> GeminiConfig:
    """gemini-tiny hearing through USM's Conformer instead (Gemma 3n's audio tower, tiny): 1 s clips as 97
    frames of 64 USM mel bins, sub-sampled 4x to 25 tokens (as many as gemini-tiny's Whisper-style clips), 2
    Conformer blocks of width 64 with 4 heads, chunks of 12 frames seeing 12 back."""
    usm = ConformerConfig(n_mels=64, dim=64, n_layers=2, n_heads=4, reduction=1, sub_channels=(16, 8))
    return gemini_tiny().replace(audio_encoder="usm", audio=None, usm=usm, usm_seconds=1, audio_pool=1)


def _gemini_nano(dim: int, n_layers: int, n_heads: int, hidden_dim: int) -> GeminiConfig:
    text = DecoderConfig(vocab_size=256000, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=1, head_dim=256,
                         hidden_dim=hidden_dim, mlp="geglu", norm="rmsnorm", tie_embeddings=True, max_seq_len=32768,
                         pad_token_id=0, bos_token_id=2, eos_token_id=1)
    audio = AudioConfig(n_mels=80, n_positions=1500, dim=768, n_layers=12, n_heads=12, hidden_dim=3072)
    return GeminiConfig(text=text, tokens=MediaTokens(placeholder=255999, image=(255993, 255994),
                                                      audio=(255995, 255996), video=(255997, 255998)),
                        image_size=448, patch_size=14, audio=audio, audio_pool=4, max_frames=16)


def gemini_nano_1() -> GeminiConfig:
    """Gemini Nano-1 (1.8B parameters; the report gives only the count). Assumed shapes: a Gemma-style
    decoder (RMSNorm, GeGLU, RoPE, multi-query attention with 256-wide heads, 256k tied vocabulary,
    32k context) of width 2048, 18 layers, 8 heads, MLP 9216; images of 448x448 as 1024 linear-embedded
    14x14 patches (Fuyu-style: the report names no image encoder); audio (audio_encoder="whisper") through a
    Whisper-small-sized encoder (768 wide, 12 layers; 30 s at 16 kHz) pooled 4x to 375 tokens; videos of up to
    16 frames.
    The last vocabulary ids are the media tokens. 1.80B parameters in all."""
    return _gemini_nano(dim=2048, n_layers=18, n_heads=8, hidden_dim=9216)


def gemini_nano_2() -> GeminiConfig:
    """Gemini Nano-2 (3.25B parameters): Nano-1's assumptions with a decoder of width 2560, 26 layers,
    10 heads, MLP 10752. 3.27B parameters in all."""
    return _gemini_nano(dim=2560, n_layers=26, n_heads=10, hidden_dim=10752)


PRESETS = {"gemini-tiny": gemini_tiny, "gemini-tiny-usm": gemini_tiny_usm, "gemini-nano-1": gemini_nano_1,
           "gemini-nano-2": gemini_nano_2}
