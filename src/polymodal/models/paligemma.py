"""PaliGemma (Beyer et al. 2024): SigLIP ViT -> linear projector -> Gemma decoder, with a prefix-LM mask.

Matches HF `PaliGemmaForConditionalGeneration`. Input layout, one row:

    input_ids       <image> x tokens_per_image x n_images, <bos>, prompt..., "\\n", suffix..., <eos>, <pad>...
    token_type_ids  0 ...                                  0      0          0     1 ...      1      0 (any)
    labels          -100 ...                                                        suffix..., <eos>, -100

Image features are projected, divided by sqrt(text dim) (the Gemma decoder multiplies every
embedding by it) and scattered into the `image_token_id` placeholders in order. token_type_ids 0
is the prefix (images + prompt: one bidirectional block), 1 the causal suffix. Without
token_type_ids the whole input is the prefix: what HF's processor gives at inference (all zeros);
so labels, which would leak through a bidirectional prefix, need token_type_ids. Positions
count from 1, as in HF.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from polymodal.encoders.vit import ViT, init_weights
from polymodal.fusion.configs import PaliGemmaConfig
from polymodal.models.parts import set_trainable
from polymodal.nn.cache import Cache
from polymodal.nn.masks import make_segments
from polymodal.nn.transformer import Decoder, ModelOutput


class PaliGemma(nn.Module):
    def __init__(self, config: PaliGemmaConfig, *, backend: str = "sdpa"):
        super().__init__()
        self.config = config
        self.vision = ViT(config.vision)
        self.projector = nn.Linear(config.vision.dim, config.text.dim)
        init_weights(self.projector)
        self.decoder = Decoder(config.text, backend=backend)

    def make_cache(self, batch: int, max_len: int, **kwargs) -> Cache:
        return self.decoder.make_cache(batch, max_len, **kwargs)

    def trainable(self, parts: tuple[str, ...] | list[str]) -> None:
        """Train exactly these parts (any of "vision", "projector", "decoder"); freeze the rest."""
        set_trainable({"vision": [self.vision], "projector": [self.projector], "decoder": [self.decoder]}, parts)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, tokens_per_image, text dim), scaled to cancel the decoder's sqrt(dim)."""
        features = self.projector(self.vision(pixel_values).features)
        return features / math.sqrt(self.config.text.dim)

    def check_placeholders(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> None:
        per_row = (input_ids == self.config.image_token_id).sum(1).tolist()
        total, per_image = sum(per_row), self.config.tokens_per_image
        if pixel_values is None:
            if total:
                raise ValueError(f"input_ids hold {total} image placeholder tokens but no pixel_values were given")
            return
        self.vision.check_pixels(pixel_values)
        bad = [i for i, n in enumerate(per_row) if n % per_image]
        if bad:
            raise ValueError(f"each image needs exactly {per_image} placeholder tokens; rows {bad} hold "
                             f"{[per_row[i] for i in bad]}")
        if total != pixel_values.shape[0] * per_image:
            raise ValueError(f"input_ids hold {total} image placeholder tokens ({total // per_image} images of "
                             f"{per_image} tokens; per row {[n // per_image for n in per_row]}) but pixel_values "
                             f"holds {pixel_values.shape[0]} images")

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: Cache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (B, S) with placeholders; pixel_values (N, 3, H, W), the images in token order
        (row by row); attention_mask (B, S) 0 on pads; token_type_ids (B, S) 0 prefix, 1 suffix;
        document_ids (B, S) packed documents (see `masks.make_segments`); labels (B, S) aligned with
        input_ids (shifted here), -100 outside the suffix. With a cache that holds tokens this is
        a decode step: input_ids only, the images were encoded at prefill."""
        if cache is not None and cache.length > 0:
            given = [k for k, v in (("pixel_values", pixel_values), ("token_type_ids", token_type_ids),
                                    ("document_ids", document_ids)) if v is not None]
            if given:
                raise ValueError(f"{given} belong to the first (prefill) call, not to decode steps")
            return self.decoder(input_ids, attention_mask=attention_mask, cache=cache, labels=labels,
                                logits_to_keep=logits_to_keep)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                        ("document_ids", document_ids), ("labels", labels)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(t.shape)}")
        if labels is not None and token_type_ids is None:
            raise ValueError("labels need token_type_ids (0 = image + prompt prefix, 1 = suffix with the labels): "
                             "without them the whole input is a bidirectional prefix that would see its labels; "
                             "pass token_type_ids=torch.ones_like(input_ids) for a plain causal LM")
        B, S = input_ids.shape
        if S > self.config.text.max_seq_len:
            raise ValueError(f"sequence of {S} tokens exceeds max_seq_len={self.config.text.max_seq_len}")
        self.decoder.check_token_ids(input_ids)
        self.check_placeholders(input_ids, pixel_values)
        embeds = self.decoder.tok_embeddings(input_ids)  # (B, S, D)
        if pixel_values is not None:
            images = self.embed_images(pixel_values).to(embeds.dtype)  # (N, tokens_per_image, D)
            embeds = embeds.masked_scatter((input_ids == self.config.image_token_id)[..., None], images)
        prefix = torch.ones_like(input_ids) if token_type_ids is None else (token_type_ids == 0).long()
        seg = make_segments(B, S, embeds.device, attention_mask=attention_mask, document_ids=document_ids,
                            block_ids=prefix)
        seg.positions = seg.positions + 1
        h = self.decoder.hidden_states(embeds, seg, cache=cache)
        return self.decoder.head(h, labels, logits_to_keep)
