"""KOSMOS-1's document format: images anywhere in the text, each `<image>`, its placeholders, `</image>`."""

from __future__ import annotations

from polymodal.data.formats import ImagesInTextFormat, fit_text
from polymodal.data.tokenizer import Tokenizer


class KosmosFormat(ImagesInTextFormat):
    """KOSMOS-1: each image as <image>, n_image_latents placeholders, </image> (`KosmosConfig.image_tokens`)."""

    family = "KOSMOS-1"

    @staticmethod
    def fit(config, tokenizer: Tokenizer):
        return config.replace(text=fit_text(config.text, tokenizer),
                              image_token_id=tokenizer.token_id("<image>"),
                              image_end_token_id=tokenizer.token_id("</image>"), placeholder_token_id=tokenizer.pad_id)

    def image_tokens(self) -> list[int]:
        return self.config.image_tokens()
