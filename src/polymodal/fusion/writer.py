"""The one image writer of early-fusion models (Chameleon Team 2024; the Gemini report's image decoding):
images as discrete VQ codes that are ordinary vocabulary entries, so the decoder's forward is the same for
text and codes.

An image in the token stream is `begin`, `tokens_per_image` code tokens, `end`. In training, an image is
laid out with placeholders (`blank`) and its pixels; `splice` fills those placeholders with the image's
codes from the frozen VQ tokenizer (always in eval mode: no dropout on the codes it writes), in input_ids
and labels alike. Which placeholders are its slots is the writer's span rule: every run of blanks
(Chameleon, whose input images are codes too) or only the runs that follow `begin` directly (Gemini, whose
input images are embeddings in spans of their own). In generation `constraint` is the engine's per-row state
machine (`fusion/constraints.py`) and `draw` decodes what each row wrote.

Chameleon is an `ImageWriter` (its VQ keys stay `vq.*`); Gemini holds one (`writer.vq.*`).

Shapes: B batch, S tokens, N images, L codes per image.
"""

from __future__ import annotations

import PIL.Image
import torch
from torch import nn

from polymodal.encoders.vq import VQConfig, VQModel, pixels_to_images
from polymodal.errors import InputError, check_pixel_values
from polymodal.fusion import spans as span_rules
from polymodal.fusion.constraints import ImageSpans
from polymodal.nn.meta import ComputedBuffers


class ImageWriter(ComputedBuffers):
    """The frozen VQ tokenizer of a model that writes images, the token of each code, and its image spans."""

    def __init__(self, vq: VQConfig, codes: list[int], *, begin: int | None, end: int | None, blank: int | None,
                 opened: bool, key: str, first: dict[str, nn.Module] | None = None):
        """codes: the token id of each VQ code; begin / end: the tokens around an image (None: it never draws);
        blank: the placeholder an image's codes replace (None: it takes no pixels); opened: only runs of
        blanks right after `begin` are slots; key: the input that gives the images (named in errors);
        first: modules registered before the VQ (a model that is its own writer keeps its decoder first, so
        its parameters, and the optimizer states of its checkpoints, stay in their order)."""
        super().__init__()
        for name, module in (first or {}).items():
            self.add_module(name, module)
        self.vq = VQModel(vq)
        self.vq.requires_grad_(False)  # trained on its own first, then frozen (as in Chameleon)
        self.codes, self.begin, self.end, self.blank, self.opened, self.key = list(codes), begin, end, blank, opened, key
        self.register_computed()

    def computed(self) -> dict[str, torch.Tensor]:
        return {"code_tokens": torch.tensor(self.codes)}

    def train(self, mode: bool = True) -> "ImageWriter":
        """The frozen tokenizer stays in eval mode while the model around it trains."""
        super().train(mode)
        self.vq.eval()
        return self

    @property
    def constraint(self) -> ImageSpans:
        """Without a VQ decoder the model cannot draw: it never opens an image and its codes stay masked
        (HF Chameleon's text-only generation, token for token)."""
        drawn = (self.begin, self.end) if self.vq.config.decoder else (None, None)
        return ImageSpans(*drawn, self.code_tokens, self.vq.config.tokens_per_image)

    @torch.no_grad()
    def image_token_ids(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, L) vocabulary ids of the images' VQ codes."""
        return self.code_tokens[self.vq.encode(pixel_values.to(self.code_tokens.device))]

    def slots(self, input_ids: torch.Tensor) -> span_rules.Spans:
        if self.opened:
            return span_rules.opened_runs(input_ids, self.begin, self.blank)
        return span_rules.runs(input_ids == self.blank)

    def splice(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The slots of input_ids -> the code tokens of pixel_values (N, 3, H, W) in [-1, 1], in row-major
        order; labels that hold a slot's blank (an image the model learns to write) get the same codes."""
        if self.blank is None:
            if pixel_values is not None:
                raise InputError(f"this model has no image placeholder token, so input_ids cannot place {self.key}")
            return input_ids, labels
        cfg = self.vq.config
        if pixel_values is not None:  # the shape first: a (3, H, W) image would read as 3 images
            check_pixel_values(pixel_values, cfg.in_channels, cfg.resolution, name=self.key)
        slots = self.slots(input_ids)
        n, per = 0 if pixel_values is None else pixel_values.shape[0], cfg.tokens_per_image
        found = (f"placeholders in images to write ({self.begin} ... {self.end})" if self.opened
                 else f"image placeholder tokens ({self.blank})")
        span_rules.check_total(slots, n * per, found, f"{n} image(s) need {n * per}: {self.key} gives {n} image(s), "
                                                      f"which need {n * per} ({per} codes each)")
        if pixel_values is None:
            return input_ids, labels
        input_ids = span_rules.scatter(input_ids, slots, self.image_token_ids(pixel_values).flatten())
        if labels is not None:
            held = span_rules.scatter(torch.zeros_like(labels, dtype=torch.bool), slots, torch.tensor(True))
            labels = torch.where(held & (labels == self.blank), input_ids, labels)
        return input_ids, labels

    def draw(self, codes: list[list[torch.Tensor]]) -> list[list[PIL.Image.Image]]:
        """Per row, a list of code tensors (L,) -> per row, PIL images, decoded in one batch."""
        flat = [c for row in codes for c in row]
        if not flat:
            return [[] for _ in codes]
        with torch.no_grad():
            images = iter(pixels_to_images(self.vq.decode(torch.stack(flat).to(self.code_tokens.device))))
        return [[next(images) for _ in row] for row in codes]
