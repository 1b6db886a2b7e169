"""KOSMOS-1 (Huang et al. 2023, "Language Is Not All You Need"): a Magneto decoder that reads images
anywhere in its text.

A CLIP ViT encodes each image; its patch features (post-LN, as Kosmos-2 takes them) go through a
Perceiver Resampler (Flamingo's, e.g. 256 patches -> 64 latents) and a linear projection to the
text width, and the result replaces the placeholders of that image in the token embeddings:

    <s> <image> [n_image_latents placeholders] </image> text <image> [...] </image> text </s>

Any number of images per document, at any place; the decoder is causal over everything. The text
decoder is torchscale's `Decoder(subln=True, xpos_rel_pos=True)` (Magneto: sub-LN, Magneto init,
xPos) expressed as a polymodal `DecoderConfig`; `convert/torchscale.py` loads its weights.

A declaration on the early-fusion core (`fusion/early.py`), one modality with a fixed span rule:
`input_ids` (B, S) hold, for every image, `image_token_id`, then n_image_latents placeholder tokens (any
id but the two image ids; `image_tokens()` writes `placeholder_token_id`, the pad token of
`KosmosFormat.fit`, which is why the span is fixed-length rather than a run of placeholders), then
`image_end_token_id`. `pixel_values` (N, 3, H, W) holds all N images of the batch in order of
appearance (row by row, left to right). Labels on placeholders are ignored: loss goes on text only.

Shapes: B batch, S tokens, N images in the batch, P patches, n latents, Dv / D vision / text width.
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.encoders.vit import ViT
from polymodal.families.kosmos.config import KosmosConfig
from polymodal.fusion.early import EarlyFusion, Modality
from polymodal.fusion.perceiver import build_resampler
from polymodal.fusion.spans import Span
from polymodal.models.parts import set_trainable
from polymodal.nn.cache import Cache
from polymodal.nn.transformer import Decoder, ModelOutput


class Kosmos(EarlyFusion, nn.Module):
    ignore_media_labels = True  # loss on text only
    cancel_embed_scale = False  # the projected latents take the decoder's sqrt(dim) as token embeddings do

    def __init__(self, config: KosmosConfig, *, backend: str = "sdpa"):
        super().__init__()
        cfg = self.config = config
        self.vision = ViT(cfg.vision)
        self.perceiver = build_resampler(cfg.vision.dim, cfg.perceiver)
        # Starts as the decoder's own linear layers do (PyTorch's default under Magneto's init); it
        # feeds the embeddings, not a residual branch, so it takes no sqrt(log 2N) gain.
        self.projector = nn.Linear(cfg.vision.dim, cfg.text.dim, bias=cfg.projector_bias)
        if cfg.text.init == "normal":
            nn.init.normal_(self.projector.weight, std=cfg.text.init_std)
            if cfg.projector_bias:
                nn.init.zeros_(self.projector.bias)
        self.decoder = Decoder(cfg.text, backend=backend)
        self.writer = None
        span = Span(cfg.placeholder_token_id, (cfg.image_token_id, cfg.image_end_token_id), fixed=True,
                    names=("<image>", "</image>"))
        self.modalities = (Modality("image", "pixel_values", "embed_images", span, cfg.n_image_latents,
                                    check=self.vision.check_pixels),)

    def trainable(self, parts: tuple[str, ...] | list[str]) -> None:
        """Train exactly these parts (any of "vision", "perceiver", "projector", "decoder"); freeze the rest.
        KOSMOS-1 kept its CLIP frozen (but for the last layer): ["perceiver", "projector", "decoder"]."""
        set_trainable({"vision": [self.vision], "perceiver": [self.perceiver], "projector": [self.projector],
                       "decoder": [self.decoder]}, parts)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, n_image_latents, D): what replaces each image's placeholders."""
        feats = self.vision(pixel_values).features[:, 1:]  # (N, P, Dv): patches; CLIP's class token dropped
        latents = self.perceiver(self.vision.post_norm(feats)[:, None])[:, 0]  # (N, n, Dv)
        return self.projector(latents)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: Cache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (B, S) and pixel_values (N, 3, H, W) as in the module docstring; attention_mask /
        position_ids / document_ids / labels / cache / logits_to_keep as in `Decoder.forward`.
        With a cache, the first call (prefill) encodes the images once; decode steps take none."""
        return self.fuse(input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         position_ids=position_ids, document_ids=document_ids, labels=labels, cache=cache,
                         logits_to_keep=logits_to_keep)
