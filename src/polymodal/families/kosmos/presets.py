"""KOSMOS-1 presets: a tiny one for tests and the built-in world, and the paper's model; `magneto_text`, its
decoder's choices."""

from __future__ import annotations

from polymodal.config import DecoderConfig
from polymodal.encoders.vit import VisionConfig
from polymodal.families.kosmos.config import KosmosConfig
from polymodal.fusion.perceiver import PerceiverConfig


def magneto_text(**changes) -> DecoderConfig:
    """torchscale's Decoder(subln=True, xpos_rel_pos=True) with KOSMOS-1's choices: biased
    projections, GELU FFN, LayerNorm (eps 1e-5), sqrt(dim) embedding scale, tied output head."""
    base = dict(mlp="gelu", norm="layernorm", norm_eps=1e-5, norm_placement="sub", positions="xpos",
                attn_bias=True, mlp_bias=True, tie_embeddings=True, embed_scale=True, init="magneto")
    return DecoderConfig(**{**base, **changes})


def kosmos_tiny() -> KosmosConfig:
    """Fast on a CPU: 32x32 images, 16 patches -> 8 latents; ids of `Tokenizer.train`'s control tokens."""
    return KosmosConfig(
        vision=VisionConfig(variant="clip", image_size=32, patch_size=8, dim=64, n_layers=2, n_heads=4, hidden_dim=128),
        perceiver=PerceiverConfig(depth=1, n_heads=4, head_dim=16, n_latents=8),
        text=magneto_text(vocab_size=512, dim=64, n_layers=2, n_heads=4, hidden_dim=256, max_seq_len=512,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2),
    )


def kosmos_1() -> KosmosConfig:
    """The paper's model: CLIP ViT-L/14 at 224 (256 patches) -> a resampler (depth 2, 8 heads) to 64 latents
    -> a bias-free linear map -> a 24-layer, 2048-wide Magneto decoder (32 heads, FFN 8192, 2048 tokens of
    context, dropout and attention dropout 0.1 in training). 1.67B parameters: the paper's "about 1.6B".
    The output projection is tied to the embeddings: unilm's `unigptmodel_xl` (KOSMOS' code) goes through
    fairseq's `base_gpt3_architecture`, which sets `share_decoder_input_output_embed`; an untied one would
    add 131M (1.80B, past the paper's figure). The vocabulary is its 64k SentencePiece one, fairseq ids
    <s>=0, <pad>=1, </s>=2; the image ids are taken from the tokenizer by the data format."""
    return KosmosConfig(
        vision=VisionConfig(variant="clip", image_size=224, patch_size=14, dim=1024, n_layers=24, n_heads=16,
                            hidden_dim=4096),
        perceiver=PerceiverConfig(depth=2, n_heads=8, head_dim=128, n_latents=64),
        text=magneto_text(vocab_size=64007, dim=2048, n_layers=24, n_heads=32, hidden_dim=8192, max_seq_len=2048,
                          dropout=0.1, bos_token_id=0, pad_token_id=1, eos_token_id=2),
        image_token_id=64005, image_end_token_id=64006, placeholder_token_id=1, projector_bias=False,
    )


PRESETS = {"kosmos-tiny": kosmos_tiny, "kosmos-1": kosmos_1}
