"""Text towers of the contrastive dual encoders: CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023).

Token + learned position embeddings, pre-LN encoder layers (the ViT's `encoder_blocks`), a final
LayerNorm, then one pooled vector per text. Matches HF `CLIPTextTransformer` and `SiglipTextModel`:
  clip    causal mask (+ padding), quick-GELU; pooled = the state at the first `eos_token_id`
          (OpenAI's rule, the highest token id, when `eos_token_id` is None)
  siglip  bidirectional (+ padding), GELU-tanh; pooled = the last position (pad or not, as in
          big_vision, which trains on max-length padding) -> linear head
Positions are 0..S-1 whatever the padding, as in both references.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polymodal.errors import InputError, check_ids, check_mask
from polymodal.config import Config, ConfigError, _check_token_ids
from polymodal.encoders.vit import check_encoder_config, encoder_blocks
from polymodal.nn.masks import attention_mask as segment_mask
from polymodal.nn.masks import make_segments
from polymodal.nn.norms import LayerNorm


@dataclass
class TextConfig(Config):
    variant: str = "siglip"  # "siglip" | "clip"
    vocab_size: int = 32000
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072
    max_seq_len: int = 64
    mlp: str = "gelu_tanh"  # "gelu_tanh" (SigLIP) | "quick_gelu" (CLIP) | "gelu"
    norm_eps: float = 1e-6
    projection_size: int | None = None  # SigLIP's head width (None: dim); CLIP has no head
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None  # CLIP pools the first one; None: the highest token id

    def __post_init__(self) -> None:
        check_encoder_config(self, "vocab_size", "max_seq_len", "projection_size")
        if self.variant == "clip":  # CLIP pools at eos_token_id; SigLIP reads no token id (HF's keep CLIP's)
            _check_token_ids(self, self.vocab_size, "eos_token_id")
        if self.variant == "clip" and self.projection_size is not None:
            raise ConfigError("CLIP's text tower has no head (the dual encoder projects it); "
                              f"projection_size must be None, got {self.projection_size}")

    @property
    def out_dim(self) -> int:
        """Width of the pooled output."""
        return self.dim if self.variant == "clip" else self.projection_size or self.dim


@dataclass
class TextOutput:
    features: torch.Tensor  # (B, S, dim) after the final LayerNorm
    pooled: torch.Tensor  # (B, out_dim)


class TextTransformer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        cfg = self.config = config
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.layers = encoder_blocks(cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden_dim, cfg.mlp, cfg.norm_eps)
        self.norm = LayerNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.out_dim) if cfg.variant == "siglip" else None
        for emb in (self.tok_embeddings, self.pos_embed):
            nn.init.normal_(emb.weight, std=0.02)

    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        cfg = self.config
        check_ids(input_ids)
        if input_ids.shape[1] > cfg.max_seq_len:
            raise InputError(f"sequence of {input_ids.shape[1]} tokens exceeds max_seq_len={cfg.max_seq_len}")
        bad = (input_ids < 0) | (input_ids >= cfg.vocab_size)
        if bad.any():
            raise InputError(f"token ids must be in [0, {cfg.vocab_size}); got {input_ids[bad].tolist()[:8]}")
        if attention_mask is not None:
            check_mask(attention_mask, input_ids.shape)
        if cfg.variant == "clip" and cfg.eos_token_id is not None:
            missing = (~(input_ids == cfg.eos_token_id).any(1)).nonzero().flatten().tolist()
            if missing:
                raise InputError(f"CLIP pools each text at its first eos_token_id ({cfg.eos_token_id}); "
                                 f"rows {missing} have none")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextOutput:
        """input_ids (B, S); attention_mask (B, S) 1 = token, 0 = padding."""
        self.check_inputs(input_ids, attention_mask)
        B, S = input_ids.shape
        clip = self.config.variant == "clip"
        x = self.tok_embeddings(input_ids) + self.pos_embed.weight[:S]  # (B, S, dim)
        mask, is_causal = None, clip and attention_mask is None
        if attention_mask is not None:  # one bidirectional block for SigLIP, causal tokens for CLIP
            block_ids = None if clip else torch.ones_like(input_ids)
            seg = make_segments(B, S, x.device, attention_mask=attention_mask, block_ids=block_ids)
            mask = segment_mask(seg, seg)
        for block in self.layers:
            x = block(x, mask=mask, is_causal=is_causal)
        x = self.norm(x)
        if not clip:
            return TextOutput(features=x, pooled=self.head(x[:, -1]))
        eos = input_ids if self.config.eos_token_id is None else (input_ids == self.config.eos_token_id).int()
        return TextOutput(features=x, pooled=x[torch.arange(B, device=x.device), eos.argmax(-1)])
