"""Chameleon (Chameleon Team 2024, "Mixed-modal early-fusion foundation models"): one decoder over
text tokens and discrete image tokens from a VQ image tokenizer, reading and writing both.

An image in the token stream is `<img>` (HF `<racm3:break>`), its VQ codes as vocabulary tokens, then
`</img>` (HF `<eoss>`). Input images come as `pixel_values` with `image_token_id` placeholders in
`input_ids` (HF `<image>`), which the frozen VQ encoder fills with code tokens. A declaration on the
early-fusion core (`fusion/early.py`) with no embedded modality: the model is its own image writer
(`fusion/writer.py`), whose slots are every run of placeholders. Writing images goes
through the one generation engine: `image_spans` constrains each row's sampling to image codes for
exactly one image's worth of tokens after `<img>`, then forces `</img>`; `images_from_codes` decodes.

The decoder is Llama with a per-head LayerNorm qk-norm and optionally Swin-style res-post-norm; it
matches HF `ChameleonForConditionalGeneration` through `convert.py`, except that HF sets
image-code logits to the dtype minimum (its checkpoints have no VQ decoder, so they may not draw), while
here the logits are raw and the state machine masks image codes outside image spans, which gives HF's
text generation.
"""

from __future__ import annotations

import torch

from polymodal.families.chameleon.config import ChameleonConfig
from polymodal.fusion.early import EarlyFusion
from polymodal.fusion.writer import ImageWriter
from polymodal.nn.cache import Cache
from polymodal.nn.transformer import Decoder, ModelOutput


class Chameleon(EarlyFusion, ImageWriter):
    writes = "pixel_values"

    def __init__(self, config: ChameleonConfig, *, backend: str = "sdpa"):
        decoder = Decoder(config.text, backend=backend)  # initialised before the VQ: a seed gives the same weights
        super().__init__(config.vq, config.code_tokens, begin=config.begin_image_id, end=config.end_image_id,
                         blank=config.image_token_id, opened=False, key=self.writes, first={"decoder": decoder})
        self.config = config

    @property
    def writer(self) -> ImageWriter:
        return self

    def splice_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                      labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fill the image placeholders of input_ids with the images' code tokens, in order. Labels
        that hold the placeholder (an image the model learns to write) get the same code tokens."""
        return self.splice(input_ids, pixel_values, labels)

    def forward(self, input_ids: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: Cache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (B, S) with `image_token_id` placeholders for pixel_values (N, 3, H, W) in [-1, 1]
        (images in row-major order of their placeholders); labels as in `Decoder`, placeholders allowed.
        The images enter as their code tokens, so the decoder runs on token ids as a text model does."""
        return self.fuse(input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         position_ids=position_ids, document_ids=document_ids, labels=labels, cache=cache,
                         logits_to_keep=logits_to_keep)
