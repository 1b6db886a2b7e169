"""The protocol every polymodal language model follows, so that generation never probes a model (gpt-fast's
prefill/decode split): `make_cache(batch, max_len)` gives a static KV cache, `prefill` runs the prompt and
its media (encoded here, once) into it, and `decode` runs one or more new tokens on what it holds.
"""

from __future__ import annotations

import torch


class LanguageModel:
    """Mixed into every model that writes tokens (listed before `nn.Module` among its bases)."""

    image_spans = None  # an `ImageSpans` state machine for a model that writes images as tokens
    # whether `decode` takes a packed call (`nn.paged_cache.PackedStep`), which may start a new sequence of text
    # (`check_prompt` checks it first: a packed call checks nothing)
    packs = False

    def check_prompt(self, input_ids: torch.Tensor) -> None:
        """Raises what `prefill` would of a prompt without media beyond its token ids (which `generate` and the
        batcher check), before any compute: a batcher's step call, which may run such a prompt or its rest after a
        cached prefix, checks nothing. Nothing here; a model whose text may hold media spans checks them."""

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

    def decode(self, input_ids: torch.Tensor, cache, *, logits_to_keep: int | torch.Tensor = 1):
        return self(input_ids=input_ids, cache=cache, logits_to_keep=logits_to_keep)
