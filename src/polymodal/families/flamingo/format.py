"""Documents -> Flamingo inputs (`model.py`): text with one `<image>` token where each image
starts, and the images apart, per row.

A document is laid out as Flamingo's interleaved web pages are (Alayrac et al. 2022, §2.4): `<bos>`,
then its segments in order, each image as a single `<image>` token (the media token the model finds
them by), each text followed by a separator (the last segment by `<eos>`); labels on target text.
The text after an image cross-attends to it alone, until the next image. Unlike the early-fusion
formats, the images are not in the token stream: a batch carries `pixel_values` (B, N, 3, H, W),
each row's images first (in order of appearance, documents of a packed row one after another), and
`media_mask` (B, N) that marks them, N the most images of any row. CLIP's preprocessing.
"""

from __future__ import annotations

import torch

from polymodal.data.collate import Collator
from polymodal.data.formats import Encoded, ImagesInTextFormat, fit_text
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.flamingo.config import FlamingoConfig


class InterleavedFormat(ImagesInTextFormat):
    """The interleaved layout with one `<image>` token per image, the images kept apart."""

    family = "this Flamingo"

    @staticmethod
    def fit(config: FlamingoConfig, tokenizer: Tokenizer) -> FlamingoConfig:
        return config.replace(text=fit_text(config.text, tokenizer), media_token_id=tokenizer.token_id("<image>"))

    def image_tokens(self) -> list[int]:
        return [self.config.media_token_id]


class InterleavedCollator(Collator):
    """`Collator`'s padding and packing of the tokens; the images batched per row, as Flamingo takes them."""

    def _rows(self, rows: list[list[Encoded]], width: int, packed: bool) -> dict[str, torch.Tensor]:
        batch = super()._rows([[Encoded(e.tokens) for e in docs] for docs in rows], width, packed)
        images = [[e.media["pixel_values"] for e in docs if e.media] for docs in rows]
        counts = [sum(len(x) for x in row) for row in images]
        if max(counts) == 0:
            return batch
        v = self.format.config.vision
        batch["pixel_values"] = torch.zeros(len(rows), max(counts), v.channels, v.image_size, v.image_size)
        batch["media_mask"] = torch.zeros(len(rows), max(counts), dtype=torch.bool)
        for r, row in enumerate(images):
            if row:
                batch["pixel_values"][r, :counts[r]] = torch.cat(row)
                batch["media_mask"][r, :counts[r]] = True
        return batch

