"""A request's prefix-cache keys (`nn.prefix_keys.PromptKeys`) from its model inputs: its per-token inputs
(input_ids and the family's `per_token_inputs`) and, for each media item, where its span lies and its content
hash (`nn.media_cache.content_hash`), found by the early-fusion model's own span finder (vLLM's
multimodal prefix caching keys blocks by the hash of each item they depend on); and where each token's group
ends, from the family's own mask inputs (PaliGemma's bidirectional prefix), as its prefill will lay it out.
"""

from __future__ import annotations

import torch

from polymodal.families import spec_of
from polymodal.fusion import spans as span_rules
from polymodal.fusion.early import EarlyFusion
from polymodal.nn.masks import make_segments
from polymodal.nn.media_cache import content_hash
from polymodal.nn.prefix_keys import PromptKeys, group_ends


def media_spans(model: EarlyFusion, input_ids: torch.Tensor, media: dict) -> tuple[list[tuple[int, int, bytes]], int]:
    """(start, length, content hash) of each media item of one prompt (1, S): each modality's spanned tokens,
    in order, cut into its items' token counts (adjacent items may share a run of blanks); and the position
    after the last span's last token, its end token included (where the prompt may be cut)."""
    spans = model.spans(input_ids, media)
    end = int(span_rules.closed_ends(spans, [m.span for m in model.modalities]).max()) if len(spans) else 0
    out = []
    for kind, m in enumerate(model.modalities):
        items = media.get(m.key)
        if items is None:
            continue
        _, columns = spans.of(kind).index()
        at = 0
        for item, size in zip(items, m.sizes(items)):
            out.append((int(columns[at]), size, content_hash(item)))
            at += size
    return out, end


def token_group_ends(model, inputs: dict[str, torch.Tensor]) -> list[int] | None:
    """Where each token's group ends in one prompt (1, S), from the family's mask inputs (`EarlyFusion.segments`:
    PaliGemma's prefix is one bidirectional block); None for a causal prompt."""
    if not isinstance(model, EarlyFusion):
        return None
    ids = inputs["input_ids"]
    block_ids = model.segments(ids, None, **{k: inputs.get(k) for k in model.per_token}).get("block_ids")
    if block_ids is None:
        return None
    return group_ends(make_segments(1, ids.shape[1], ids.device, block_ids=block_ids).groups[0].tolist())


def prompt_keys(model, inputs: dict[str, torch.Tensor]) -> PromptKeys | None:
    """The keys of one request's prompt (batch of 1), or None where an input is neither per-token nor a
    modality's media (an image a writer splices in as codes): such a prompt is not cached."""
    per_token = {k: inputs[k] for k in ("input_ids", *spec_of(model).per_token_inputs) if inputs.get(k) is not None}
    media = {k: v for k, v in inputs.items() if k not in per_token and v is not None}
    ends = token_group_ends(model, inputs)
    if not media:
        return PromptKeys(per_token, ends=ends)
    known = {m.key for m in model.modalities} if isinstance(model, EarlyFusion) else set()
    if not set(media) <= known:
        return None
    spans, end = media_spans(model, inputs["input_ids"], media)
    return PromptKeys(per_token, spans, media_end=end, ends=ends)
