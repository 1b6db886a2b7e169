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
from polymodal.errors import InputError
from polymodal.fusion.configs import PaliGemmaConfig
from polymodal.models import fusion
from polymodal.models.parts import set_trainable
from polymodal.nn.cache import Cache
from polymodal.nn.transformer import Decoder, ModelOutput
from polymodal.nn.language_model import LanguageModel


class PaliGemma(LanguageModel, nn.Module):
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

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: Cache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (B, S) with placeholders; pixel_values (N, 3, H, W), the images in token order
        (row by row); attention_mask (B, S) 0 on pads; token_type_ids (B, S) 0 prefix, 1 suffix;
        document_ids (B, S) packed documents (see `masks.make_segments`); labels (B, S) aligned with
        input_ids (shifted here), -100 outside the suffix. With a cache that holds tokens this is
        a decode step: input_ids only, the images were encoded at prefill."""
        if fusion.decoding(cache, pixel_values=pixel_values, token_type_ids=token_type_ids, document_ids=document_ids):
            return self.decoder(input_ids, attention_mask=attention_mask, cache=cache, labels=labels,
                                logits_to_keep=logits_to_keep)
        fusion.check_inputs(self.decoder, input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            document_ids=document_ids, labels=labels)
        if labels is not None and token_type_ids is None:
            raise InputError("labels need token_type_ids (0 = image + prompt prefix, 1 = suffix with the labels): "
                             "without them the whole input is a bidirectional prefix that would see its labels; "
                             "pass token_type_ids=torch.ones_like(input_ids) for a plain causal LM")
        spans = self.media_spans(input_ids, pixel_values)
        embeds = self.decoder.tok_embeddings(input_ids)  # (B, S, D)
        if pixel_values is not None:
            embeds = fusion.scatter(embeds, spans, self.embed_images(pixel_values).flatten(0, 1))
        prefix = torch.ones_like(input_ids) if token_type_ids is None else (token_type_ids == 0).long()
        return fusion.prefill(self.decoder, embeds, attention_mask=attention_mask, document_ids=document_ids,
                              block_ids=prefix, first_position=1, labels=labels, cache=cache,
                              logits_to_keep=logits_to_keep)

    def media_spans(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> fusion.Spans:
        """The runs of image placeholders (adjacent images make one run), checked against the images."""
        held = input_ids == self.config.image_token_id
        spans, per_row = fusion.runs(held), held.sum(1).cpu()
        per_image, n_images = self.config.tokens_per_image, 0 if pixel_values is None else pixel_values.shape[0]
        if pixel_values is None:
            fusion.check_total(spans, 0, "image placeholder tokens", "no pixel_values were given")
            return spans
        self.vision.check_pixels(pixel_values)
        bad = (per_row % per_image).nonzero()[:, 0].tolist()
        if bad:
            raise InputError(f"each image needs exactly {per_image} placeholder tokens; rows {bad} hold "
                             f"{per_row[bad].tolist()}")
        total = int(per_row.sum())
        fusion.check_total(spans, n_images * per_image, f"image placeholder tokens ({total // per_image} images of "
                           f"{per_image} tokens; per row {(per_row // per_image).tolist()})",
                           f"pixel_values holds {n_images} images")
        return spans
