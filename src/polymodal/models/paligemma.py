"""PaliGemma (Beyer et al. 2024): SigLIP ViT -> linear projector -> Gemma decoder, with a prefix-LM mask.

Matches HF `PaliGemmaForConditionalGeneration`: `input_ids` hold one `image_token_id` placeholder
per image token (images first, then `<bos>` prefix `\\n` suffix); image features are projected,
divided by sqrt(text dim) (the Gemma decoder multiplies every embedding by it) and scattered into
the placeholders. `token_type_ids` 0 marks the prefix (image + prompt: one bidirectional block),
1 the suffix (causal; labels go there). Without `token_type_ids` the whole input is causal, as in
HF. Positions are 1-based, as in HF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from polymodal.config import Config, ConfigError, DecoderConfig
from polymodal.encoders.vit import ViT, VisionConfig
from polymodal.nn.cache import Cache
from polymodal.nn.masks import make_segments
from polymodal.nn.transformer import Decoder, ModelOutput

PARTS = ("vision", "projector", "decoder")


@dataclass
class PaliGemmaConfig(Config):
    vision: VisionConfig
    text: DecoderConfig
    image_token_id: int = 257152

    def __post_init__(self) -> None:
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(f"image_token_id ({self.image_token_id}) must be a token id below text.vocab_size "
                              f"({self.text.vocab_size})")

    @property
    def tokens_per_image(self) -> int:
        return self.vision.n_patches


class PaliGemma(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision = ViT(config.vision)
        self.projector = nn.Linear(config.vision.dim, config.text.dim)
        self.decoder = Decoder(config.text)

    def make_cache(self, batch: int, max_len: int, **kwargs) -> Cache:
        return self.decoder.make_cache(batch, max_len, **kwargs)

    def trainable(self, parts: tuple[str, ...] | list[str]) -> None:
        """Train exactly these parts (any of "vision", "projector", "decoder"); freeze the rest."""
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown parts {unknown}; choose from {list(PARTS)}")
        for name in PARTS:
            getattr(self, name).requires_grad_(name in parts)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, tokens_per_image, text dim), scaled to cancel the decoder's sqrt(dim)."""
        features = self.projector(self.vision(pixel_values).features)
        return features / math.sqrt(self.config.text.dim)

    def check_placeholders(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        per_row = (input_ids == self.config.image_token_id).sum(1)
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        per_image = self.config.tokens_per_image
        if pixel_values is None and per_row.any():
            raise ValueError(f"input_ids hold {int(per_row.sum())} image placeholder tokens but no pixel_values "
                             "were given")
        if pixel_values is not None:
            self.vision.check_pixels(pixel_values)
            bad = [i for i, n in enumerate(per_row.tolist()) if n % per_image]
            if bad:
                raise ValueError(f"each image needs exactly {per_image} placeholder tokens; rows {bad} hold "
                                 f"{[int(per_row[i]) for i in bad]}")
            if int(per_row.sum()) != n_images * per_image:
                raise ValueError(f"input_ids hold {int(per_row.sum())} image placeholder tokens "
                                 f"({int(per_row.sum()) // per_image} images of {per_image} tokens) but "
                                 f"pixel_values holds {n_images} images")
        return per_row

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: Cache | None = None,
                logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (B, S) with placeholders; pixel_values (N, 3, H, W), images in row order;
        token_type_ids (B, S) 0 = prefix, 1 = suffix; labels (B, S) with -100 outside the suffix."""
        if cache is not None and cache.length > 0:  # decode: images were encoded at prefill
            if pixel_values is not None:
                raise ValueError("pixel_values belong to the first (prefill) call, not to decode steps")
            return self.decoder(input_ids, cache=cache, labels=labels, logits_to_keep=logits_to_keep)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        self.decoder.check_token_ids(input_ids)
        self.check_placeholders(input_ids, pixel_values)
        embeds = self.decoder.tok_embeddings(input_ids)
        if pixel_values is not None:
            images = self.embed_images(pixel_values).to(embeds.dtype)
            embeds = embeds.masked_scatter((input_ids == self.config.image_token_id)[..., None], images)
        B, S = input_ids.shape
        if S > self.config.text.max_seq_len:
            raise ValueError(f"sequence of {S} tokens exceeds max_seq_len={self.config.text.max_seq_len}")
        block_ids = None if token_type_ids is None else (token_type_ids == 0).long()
        seg = make_segments(B, S, embeds.device, attention_mask=attention_mask, block_ids=block_ids)
        seg.positions = seg.positions + 1  # PaliGemma counts positions from 1
        h = self.decoder.hidden_states(embeds, seg, cache=cache,
                                       plain_causal=attention_mask is None and block_ids is None)
        return self.decoder.head(h, labels, logits_to_keep)
