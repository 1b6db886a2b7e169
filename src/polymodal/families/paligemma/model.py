"""PaliGemma (Beyer et al. 2024): SigLIP ViT -> linear projector -> Gemma decoder, with a prefix-LM mask.

Matches HF `PaliGemmaForConditionalGeneration`. Input layout, one row:

    input_ids       <image> x tokens_per_image x n_images, <bos>, prompt..., "\\n", suffix..., <eos>, <pad>...
    token_type_ids  0 ...                                  0      0          0     1 ...      1      0 (any)
    labels          -100 ...                                                        suffix..., <eos>, -100

A declaration on the early-fusion core (`fusion/early.py`): one modality, images, whose features are
projected, divided by sqrt(text dim) (the Gemma decoder multiplies every embedding by it) and scattered into
the bare runs of `image_token_id` placeholders in order (adjacent images share a run). token_type_ids 0
is the prefix (images + prompt: one bidirectional block), 1 the causal suffix. Without
token_type_ids the whole input is the prefix: what HF's processor gives at inference (all zeros);
so labels, which would leak through a bidirectional prefix, need token_type_ids. Positions
count from 1, as in HF.

`interpolate_pos_encoding=True` (HF's flag, in `forward`, `prefill` and `pm.generate`) reads images of any
multiple of the patch size with the weights' position embeddings interpolated for that call (HF's
`interpolate_pos_encoding`), each image taking (height / patch) x (width / patch) placeholders; a collator
lays prompts out at that size from `config.at_image_size(size)`. `resize_images` does the same once, for good.
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.encoders.mask_vae import MaskVAE
from polymodal.encoders.vit import ViT, init_weights, resize_position_embeddings
from polymodal.errors import InputError, InputTypeError
from polymodal.families.paligemma.config import PaliGemmaConfig
from polymodal.fusion.early import EarlyFusion, Modality
from polymodal.fusion.spans import Span
from polymodal.models.parts import set_trainable
from polymodal.nn.cache import Cache
from polymodal.nn.transformer import Decoder, ModelOutput


class PaliGemma(EarlyFusion, nn.Module):
    per_token = ("token_type_ids",)
    options = ("interpolate_pos_encoding",)

    def __init__(self, config: PaliGemmaConfig, *, backend: str = "sdpa"):
        super().__init__()
        self.config = config
        self.vision = ViT(config.vision)
        self.projector = nn.Linear(config.vision.dim, config.text.dim)
        init_weights(self.projector)
        self.decoder = Decoder(config.text, backend=backend)
        self.writer = None
        # codes segmentation tokens (data/locations.py); frozen once fitted, never in the forward pass
        self.mask_vae = MaskVAE(config.mask_vae).requires_grad_(False) if config.mask_vae is not None else None
        self.modalities = self._modalities()

    def _modalities(self) -> tuple[Modality, ...]:
        return (Modality("image", "pixel_values", "embed_images", Span(self.config.image_token_id),
                         self.config.tokens_per_image, check=self.vision.check_pixels),)

    def modalities_for(self, interpolate_pos_encoding: bool = False) -> tuple[Modality, ...]:
        if not isinstance(interpolate_pos_encoding, bool):
            raise InputTypeError(f"interpolate_pos_encoding must be true or false, got {interpolate_pos_encoding!r}")
        if not interpolate_pos_encoding:
            return self.modalities
        patch = self.config.vision.patch_size
        return (Modality("image", "pixel_values", "embed_images_interpolated", Span(self.config.image_token_id),
                         lambda px: [(px.shape[-2] // patch) * (px.shape[-1] // patch)] * len(px),
                         check=lambda px: self.vision.check_pixels(px, interpolate_pos_encoding=True)),)

    def resize_images(self, image_size: int) -> PaliGemma:
        """Read image_size x image_size images from now on (PaliGemma's 448 and 896 from 224 weights): SigLIP's
        position embeddings interpolated once, as HF's `interpolate_pos_encoding` does, and the image token
        count (image_size / patch)^2 with them. In place; returns the model, whose config says the new size."""
        config = self.config.at_image_size(image_size)
        vision = config.vision
        old = self.vision.pos_embed.weight
        resized = resize_position_embeddings({"pos_embed.weight": old.detach()}, vision)["pos_embed.weight"]
        self.vision.pos_embed = nn.Embedding(*resized.shape, device=old.device, dtype=old.dtype)
        with torch.no_grad():
            self.vision.pos_embed.weight.copy_(resized)
        self.vision.pos_embed.weight.requires_grad_(old.requires_grad)
        self.config, self.vision.config = config, vision
        self.modalities = self._modalities()
        return self

    def trainable(self, parts: tuple[str, ...] | list[str]) -> None:
        """Train exactly these parts (any of "vision", "projector", "decoder"); freeze the rest."""
        set_trainable({"vision": [self.vision], "projector": [self.projector], "decoder": [self.decoder]}, parts)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, tokens_per_image, text dim)."""
        return self.projector(self.vision(pixel_values).features)

    def embed_images_interpolated(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W), H and W multiples of the patch -> (N, (H / patch) * (W / patch), text dim)."""
        return self.projector(self.vision(pixel_values, interpolate_pos_encoding=True).features)

    def segments(self, input_ids: torch.Tensor, labels: torch.Tensor | None, *,
                 token_type_ids: torch.Tensor | None = None) -> dict:
        """The prefix (image + prompt, token_type_ids 0) is one bidirectional block; positions count from 1."""
        if labels is not None and token_type_ids is None:
            raise InputError("labels need token_type_ids (0 = image + prompt prefix, 1 = suffix with the labels): "
                             "without them the whole input is a bidirectional prefix that would see its labels; "
                             "pass token_type_ids=torch.ones_like(input_ids) for a plain causal LM")
        prefix = torch.ones_like(input_ids) if token_type_ids is None else (token_type_ids == 0).long()
        return {"block_ids": prefix, "first_position": 1}

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: Cache | None = None, logits_to_keep: int = 0,
                interpolate_pos_encoding: bool = False) -> ModelOutput:
        """input_ids (B, S) with placeholders; pixel_values (N, 3, H, W), the images in token order
        (row by row); attention_mask (B, S) 0 on pads; token_type_ids (B, S) 0 prefix, 1 suffix;
        document_ids (B, S) packed documents (see `masks.make_segments`); labels (B, S) aligned with
        input_ids (shifted here), -100 outside the suffix. With a cache that holds tokens this is
        a decode step: input_ids only, the images were encoded at prefill. interpolate_pos_encoding: images of
        any multiple of the patch size (see the module docstring)."""
        return self.fuse(input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         token_type_ids=token_type_ids, document_ids=document_ids, labels=labels, cache=cache,
                         logits_to_keep=logits_to_keep, interpolate_pos_encoding=interpolate_pos_encoding)
