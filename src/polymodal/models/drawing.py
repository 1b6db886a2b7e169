"""Image output for an early-fusion decoder through discrete VQ codes (Chameleon Team 2024; the Gemini
report's image decoding), as ordinary vocabulary entries: the token embedding reads them and the LM head
predicts them, so the decoder's forward is the same for text and codes.

A written image is `begin`, `tokens_per_image` code tokens, `end`: its own pair of tokens, apart from the
input image spans (`<img>` patches `</img>`), so input patch spans and output code spans never mix. In
training a document's target image is laid out as `begin`, placeholders, `end` with its pixels; `splice`
fills those placeholders (only the ones inside written-image spans) with the image's codes from the frozen
VQ tokenizer, in input_ids and labels alike. In generation `spans` is the engine's per-row state machine
(`models/constraints.py`) and `images_from_codes` decodes what each row wrote.

Shapes: B batch, S tokens, N images, L codes per image.
"""

from __future__ import annotations

import PIL.Image
import torch

from polymodal.encoders.vq import VQConfig, VQModel, pixels_to_images
from polymodal.errors import InputError, check_pixel_values
from polymodal.models.constraints import ImageSpans
from polymodal.nn.meta import ComputedBuffers


def decode_rows(vq: VQModel, codes: list[list[torch.Tensor]]) -> list[list[PIL.Image.Image]]:
    """Per row, a list of code tensors (L,) -> per row, PIL images, decoded in one batch."""
    flat = [c for row in codes for c in row]
    if not flat:
        return [[] for _ in codes]
    with torch.no_grad():
        images = iter(pixels_to_images(vq.decode(torch.stack(flat).to(next(vq.parameters()).device))))
    return [[next(images) for _ in row] for row in codes]


def written_slots(input_ids: torch.Tensor, begin: int, placeholder: int) -> torch.Tensor:
    """(B, S) bool: the placeholders of a run that follows `begin` directly, found without a loop over tokens."""
    position = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    opener = torch.where(input_ids != placeholder, position, -1).cummax(1).values  # last other token so far
    before = input_ids.gather(1, opener.clamp(min=0))
    return (input_ids == placeholder) & (opener >= 0) & (before == begin)


class ImageWriter(ComputedBuffers):
    """The frozen VQ tokenizer of a model that writes images, and the token ids of its image spans."""

    def __init__(self, vq: VQConfig, first_code: int, begin: int, end: int, placeholder: int):
        super().__init__()
        self.vq = VQModel(vq)
        self.vq.requires_grad_(False)  # trained on its own first, then frozen (as in Chameleon)
        self.begin, self.end, self.placeholder, self.first_code = begin, end, placeholder, first_code
        self.register_computed()

    def computed(self) -> dict[str, torch.Tensor]:
        return {"code_tokens": torch.arange(self.first_code, self.first_code + self.vq.config.num_embeddings)}

    def train(self, mode: bool = True) -> "ImageWriter":
        """The frozen tokenizer stays in eval mode (no dropout on the codes it writes) while the model trains."""
        super().train(mode)
        self.vq.eval()
        return self

    @property
    def spans(self) -> ImageSpans:
        """Without a VQ decoder the model cannot draw: it never opens an image and its codes stay masked."""
        drawn = (self.begin, self.end) if self.vq.config.decoder else (None, None)
        return ImageSpans(*drawn, self.code_tokens, self.vq.config.tokens_per_image)

    def splice(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
               labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Placeholders inside written-image spans -> the code tokens of pixel_values (N, 3, H, W) in [-1, 1],
        in row-major order; labels that hold them (the images the model learns to write) get the same."""
        slots = written_slots(input_ids, self.begin, self.placeholder)
        cfg = self.vq.config
        if pixel_values is not None:  # the shape first: a (3, H, W) image would read as 3 images
            check_pixel_values(pixel_values, cfg.in_channels, cfg.resolution)
        n_slots, n_images = int(slots.sum()), 0 if pixel_values is None else pixel_values.shape[0]
        if n_slots != n_images * cfg.tokens_per_image:
            raise InputError(f"input_ids hold {n_slots} placeholders in images to write ({self.begin} ... "
                             f"{self.end}); target_pixel_values gives {n_images} image(s), which need "
                             f"{n_images * cfg.tokens_per_image} ({cfg.tokens_per_image} codes each)")
        if pixel_values is None:
            return input_ids, labels
        with torch.no_grad():
            codes = self.code_tokens[self.vq.encode(pixel_values.to(self.code_tokens.device))]  # (N, L)
        input_ids = input_ids.masked_scatter(slots, codes.flatten())
        if labels is not None:
            labels = torch.where(slots & (labels == self.placeholder), input_ids, labels)
        return input_ids, labels

    def images_from_codes(self, codes: list[list[torch.Tensor]]) -> list[list[PIL.Image.Image]]:
        return decode_rows(self.vq, codes)
