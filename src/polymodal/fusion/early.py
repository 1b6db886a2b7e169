"""The one early-fusion model (torchtune's `EarlyFusionModel`; PaliGemma, KOSMOS-1, Gemini/Fuyu and
Chameleon are declarations on it): one decoder, and a table of modalities whose embeddings take the
place of placeholder spans in the decoder's input. Flamingo, which fuses by cross-attention instead,
shares its prefill/decode split (`decoding`).

A family declares, per modality, a `Modality`: the input key its media come in, the model attribute that
encodes them (so state-dict keys stay the family's own), its span rule and blank (`fusion/spans.py`),
its tokens per item and its check; and, for a model that writes images, an `ImageWriter`
(`fusion/writer.py`) at `writer`. `EarlyFusion.fuse`, once for all of them:
  - splits prefill from decode (`decoding`): media are encoded once; a decode step runs the plain decoder
  - checks the inputs, splices written images' codes in (the writer), finds the spans, checks them against
    the media (names both numbers) and the context, all before any compute
  - encodes each modality once, lays the embeddings out in span order and scatters them in
  - builds the segments (padding, packed documents, the family's prefix blocks) and runs the decoder

Shapes: B batch, S tokens, N media, P tokens per media, T spanned tokens in all, D decoder width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from polymodal.errors import InputError, check_ids, check_mask, check_tensors
from polymodal.fusion import spans as span_rules
from polymodal.fusion.spans import Span, Spans
from polymodal.nn.cache import Cache
from polymodal.nn.language_model import LanguageModel
from polymodal.nn.masks import make_segments
from polymodal.nn.transformer import Decoder, ModelOutput

IGNORE = -100


@dataclass(frozen=True)
class Modality:
    """One row of an early-fusion model's table of input modalities."""

    name: str  # one media, in errors: "image"
    key: str  # the input that gives its media: "pixel_values"
    encoder: str  # the model attribute that encodes them: a module, or a method over several, -> (N, P, D) or [(P, D)]
    span: Span  # where each media sits in input_ids, and the blank its embeddings replace
    tokens: int | Callable[[Any], list[int]]  # tokens per media, or the media given -> each one's count
    plural: str = ""  # several media, in errors ("" : name + "s")
    check: Callable[[Any], None] | None = None  # a clear error for malformed media, before any compute

    def sizes(self, media) -> list[int]:
        if media is None:
            return []
        return [self.tokens] * len(media) if isinstance(self.tokens, int) else self.tokens(media)

    @property
    def several(self) -> str:
        return self.plural or f"{self.name}s"


class EarlyFusion(LanguageModel):
    """Mixed into a family's model (before `nn.Module`), which sets `decoder`, `modalities` (its table), its
    encoders and `writer` (an `ImageWriter`, or None for a model that writes text); class attributes say the
    rest of its layout."""

    modalities: tuple[Modality, ...] = ()  # set by the instance (its entries may read its config)
    writes: str | None = None  # the input that gives the images the writer splices in as codes
    per_token: tuple[str, ...] = ()  # the family's own inputs laid out like input_ids (token_type_ids)
    options: tuple[str, ...] = ()  # the family's own per-call switches of its table (interpolate_pos_encoding)
    ignore_media_labels = False  # labels on media spans are -100 (KOSMOS-1: loss on text only)
    cancel_embed_scale = True  # media enter as encoded: divided by the sqrt(dim) the decoder multiplies in

    @property
    def image_spans(self):
        """The engine's image-span state machine (`fusion/constraints.py`); None for a model that writes text."""
        return self.writer.constraint if self.writer is not None else None

    def images_from_codes(self, codes: list[list[torch.Tensor]]):
        """Per row, a list of code tensors (L,) -> per row, PIL images."""
        return self.writer.draw(codes)

    def make_cache(self, batch: int, max_len: int, **kwargs) -> Cache:
        return self.decoder.make_cache(batch, max_len, **kwargs)

    def prefill(self, input_ids: torch.Tensor, cache: Cache, *, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 1, encoder_caches: dict | None = None, **media) -> ModelOutput:
        """The prompt and its media (encoded here, once) into an empty cache; encoder_caches: media key ->
        `nn.media_cache.EncoderCache` that encodes that modality's media (a server's, so the same image sent
        twice is encoded once)."""
        return self.fuse(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=logits_to_keep,
                         encoder_caches=encoder_caches, **media)

    def decode(self, input_ids: torch.Tensor, cache: Cache, *, logits_to_keep: int | torch.Tensor = 1) -> ModelOutput:
        """New tokens on what the cache holds: the plain decoder, no media."""
        return self.decoder(input_ids, cache=cache, logits_to_keep=logits_to_keep)

    @property
    def packs(self) -> bool:
        return self.decoder.packs

    def check_prompt(self, input_ids: torch.Tensor) -> None:
        """`fuse`'s checks of a prompt without media: known ids, no placeholder, spans closed."""
        check_inputs(self.decoder, input_ids)
        if self.writer is not None:
            self.write(input_ids, None, None)
        table = self.modalities_for()
        self.check_media(self.spans(input_ids, {}, table), {}, 1, table)

    def modalities_for(self, **options) -> tuple[Modality, ...]:
        """The table one call reads, given the family's `options` (by default, and with none given: `modalities`)."""
        return self.modalities

    def segments(self, input_ids: torch.Tensor, labels: torch.Tensor | None, **own) -> dict[str, Any]:
        """The family's own mask and position inputs for `prefill` from its own inputs (`per_token`)."""
        return {}

    def fuse(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
             labels: torch.Tensor | None = None, cache: Cache | None = None, logits_to_keep: int = 0,
             encoder_caches: dict | None = None, **inputs) -> ModelOutput:
        """input_ids (B, S) with media spans; `inputs`: each modality's media by its key (in span order, row
        by row), the writer's images, the family's own per-token inputs. With a cache that holds tokens this
        is a decode step: tokens only, the media were encoded at prefill."""
        table = self.modalities_for(**{k: inputs.pop(k) for k in self.options if k in inputs})
        if decoding(cache, **inputs):
            return self.decoder(input_ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids,
                                document_ids=document_ids, labels=labels, logits_to_keep=logits_to_keep)
        own = {k: inputs.pop(k, None) for k in self.per_token}
        check_inputs(self.decoder, input_ids, attention_mask=attention_mask, document_ids=document_ids,
                     labels=labels, **own)
        layout = self.segments(input_ids, labels, **own)
        if self.writes is not None and (self.writer is not None or inputs.get(self.writes) is not None):
            input_ids, labels = self.write(input_ids, inputs.pop(self.writes, None), labels)
        media = self.check_keys({k: v for k, v in inputs.items() if v is not None}, table)
        spans = self.spans(input_ids, media, table)
        check_length(self.decoder, input_ids)
        sizes = self.check_media(spans, media, input_ids.shape[0], table)
        embeds = self.decoder.tok_embeddings(input_ids)  # (B, S, D)
        if media:
            embeds = span_rules.scatter(embeds, spans, self.embed(spans, sizes, media, table, encoder_caches))
            if labels is not None and self.ignore_media_labels:
                labels = span_rules.scatter(labels, spans, torch.tensor(IGNORE))
        return prefill(self.decoder, embeds, attention_mask=attention_mask, document_ids=document_ids,
                       position_ids=position_ids, labels=labels, cache=cache, logits_to_keep=logits_to_keep,
                       **layout)

    def write(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.writer is None:
            raise InputError(f"{self.writes} given, but this model writes no images (config.vq is None)")
        return self.writer.splice(input_ids, pixel_values, labels)

    def check_keys(self, media: dict[str, Any], table: tuple[Modality, ...]) -> dict[str, Any]:
        known = [m.key for m in table]
        unknown = sorted(set(media) - set(known))
        if unknown:
            raise InputError(f"{unknown} given, but this {type(self).__name__} reads {known or 'no media'}")
        return media

    def spans(self, input_ids: torch.Tensor, media: dict[str, Any], table: tuple[Modality, ...] | None = None) -> Spans:
        """Every modality's spans in row-major order, kinds indexing the table (default: `modalities`)."""
        table = self.modalities if table is None else table
        rules, names = [m.span for m in table], [m.name for m in table]
        fixed = None
        if rules and rules[0].fixed:
            m = table[0]
            given = None if media.get(m.key) is None else len(media[m.key])
            fixed = (m.key, m.tokens, given, self.decoder.config.max_seq_len)
        return span_rules.find(input_ids, rules, names, fixed=fixed)

    def check_media(self, spans: Spans, media: dict[str, Any], batch: int,
                    table: tuple[Modality, ...]) -> dict[str, list[int]]:
        """Each modality's media checked, then counted against its spans; returns each one's tokens per media."""
        sizes = {}
        for k, m in enumerate(table):
            if media.get(m.key) is not None and m.check is not None:
                m.check(media[m.key])
            sizes[m.key] = m.sizes(media.get(m.key))
            if m.span.wrapped:
                span_rules.check_spans(spans.of(k), sizes[m.key], m.name, m.key, m.several)
            else:
                check_runs(spans, sizes[m.key], m, media.get(m.key) is not None, batch)
        return sizes

    def embed(self, spans: Spans, sizes: dict[str, list[int]], media: dict[str, Any],
              table: tuple[Modality, ...], encoder_caches: dict | None = None) -> torch.Tensor:
        """(T, D): every media encoded once (a batch per modality, through its encoder cache if given), laid out
        in span order."""
        encoded = []
        caches = encoder_caches or {}
        for m in table:
            out = []
            if m.key in media:
                encoder, given = getattr(self, m.encoder), media[m.key]
                cache = caches.get(m.key) if torch.is_tensor(given) else None
                out = cache.encode(given, encoder) if cache is not None else encoder(given)
            encoded.append(list(out.flatten(0, 1).split(sizes[m.key]) if torch.is_tensor(out) else out))
        if not table[0].span.wrapped:  # one run of blanks, however its media were cut
            feats = torch.cat(encoded[0])
        else:
            queues = [iter(e) for e in encoded]
            feats = torch.cat([next(queues[k]) for k in spans.kinds.tolist()])
        if self.cancel_embed_scale and self.decoder.config.embed_scale:
            feats = feats / math.sqrt(self.decoder.config.dim)
        return feats


def check_runs(spans: Spans, sizes: list[int], m: Modality, given: bool, batch: int) -> None:
    """Bare runs of blanks against the media: with a fixed count per media, each row's runs hold whole media
    (adjacent ones share a run); then the blanks number the media's tokens."""
    found = f"{m.name} placeholder tokens"
    if not given:
        return span_rules.check_total(spans, 0, found, f"no {m.key} were given")
    if not isinstance(m.tokens, int):
        return span_rules.check_total(spans, sum(sizes), found, f"{m.key} gives {sum(sizes)} {m.name} embeddings")
    per_row = torch.zeros(batch, dtype=torch.long).index_add_(0, spans.rows.cpu(), spans.lengths.cpu())
    bad = (per_row % m.tokens).nonzero()[:, 0].tolist()
    if bad:
        raise InputError(f"each {m.name} needs exactly {m.tokens} placeholder tokens; rows {bad} hold "
                         f"{per_row[bad].tolist()}")
    total = int(per_row.sum())
    span_rules.check_total(spans, sum(sizes), f"{found} ({total // m.tokens} {m.several} of {m.tokens} tokens; per "
                           f"row {(per_row // m.tokens).tolist()})", f"{m.key} holds {len(sizes)} {m.several}")


def decoding(cache: Cache | None, **prefill_only: torch.Tensor | None) -> bool:
    """True when the cache already holds tokens: a decode step, which takes none of the prefill-only inputs."""
    check_tensors(**prefill_only)
    if cache is None or cache.length == 0:
        return False
    given = [k for k, v in prefill_only.items() if v is not None]
    if given:
        raise InputError(f"{given} belong to the first (prefill) call, not to decode steps: media are encoded once")
    return True


def check_inputs(decoder: Decoder, input_ids: torch.Tensor, **same_shape: torch.Tensor | None) -> None:
    """input_ids (B, S) of known tokens, and every per-token input given with its shape (an attention_mask of
    0s and 1s). The context length is checked once the spans are known (`check_length`)."""
    check_ids(input_ids)
    for name, t in same_shape.items():
        if name == "attention_mask" and t is not None:
            check_mask(t, input_ids.shape)
        check_tensors(**{name: t})
        if t is not None and t.shape != input_ids.shape:
            raise InputError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}")
    decoder.check_token_ids(input_ids)


def check_length(decoder: Decoder, input_ids: torch.Tensor) -> None:
    if input_ids.shape[1] > decoder.config.max_seq_len:
        raise InputError(f"sequence of {input_ids.shape[1]} tokens exceeds max_seq_len={decoder.config.max_seq_len}")


def prefill(decoder: Decoder, embeds: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
            document_ids: torch.Tensor | None = None, block_ids: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, first_position: int = 0, labels: torch.Tensor | None = None,
            cache: Cache | None = None, logits_to_keep: int = 0) -> ModelOutput:
    """The decoder over fused embeddings (B, S, D) (unscaled; the decoder applies its embedding scale):
    segments from the padding, packed documents and bidirectional blocks (see `masks.make_segments`),
    positions counted from first_position unless given."""
    B, S, _ = embeds.shape
    seg = make_segments(B, S, embeds.device, attention_mask=attention_mask, document_ids=document_ids,
                        block_ids=block_ids, position_ids=position_ids)
    if first_position:
        seg.positions = seg.positions + first_position
    plain = all(t is None for t in (attention_mask, document_ids, block_ids))
    h = decoder.hidden_states(embeds, seg, cache=cache, plain_causal=plain)
    return decoder.head(h, labels, logits_to_keep)
