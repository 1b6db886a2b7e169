"""The protocol every polymodal language model follows, so that generation never probes a model (gpt-fast's
prefill/decode split): `make_cache(batch, max_len)` gives a static KV cache, `prefill` runs the prompt and
its media (encoded here, once) into it, and `decode` runs one or more new tokens on what it holds.
"""

from __future__ import annotations

import torch


class LanguageModel:
    """Mixed into every model that writes tokens (listed before `nn.Module` among its bases)."""

    image_spans = None  # an `ImageSpans` state machine for a model that writes images as tokens
    packs = False  # whether `decode` takes a packed call (`nn.paged_cache.PackedStep`): its decoder's rows alone

    @property
    def text_config(self):
        """The decoder's config: vocabulary, context length, special ids."""
        return self.decoder.config

    def prefill(self, input_ids: torch.Tensor, cache, *, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 1, encoder_caches: dict | None = None, **media):
        """encoder_caches (media key -> `nn.media_cache.EncoderCache`) serve a model whose media are encoded into
        its token stream (`fusion.early.EarlyFusion`); a model that reads media otherwise encodes them itself."""
        return self(input_ids=input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=logits_to_keep,
                    **media)

    def check_prompt(self, input_ids: torch.Tensor) -> None:
        """Raises what `prefill` raises of a text prompt (1, S) without media, before any compute: a packed call
        (`decode` starting a new sequence) checks nothing."""
        self.decoder.check_token_ids(input_ids)

    def decode(self, input_ids: torch.Tensor, cache, *, logits_to_keep: int | torch.Tensor = 1):
        return self(input_ids=input_ids, cache=cache, logits_to_keep=logits_to_keep)
