"""Flamingo (Alayrac et al. 2022): a frozen decoder LM, a Perceiver Resampler over vision features, and a
tanh-gated cross-attention block before every k-th LM block; each text token attends only to the
latest media that started at or before it. Matches HF `IdeficsForVisionText2Text` (a Flamingo
reproduction) weight for weight through `convert.py`.

The LM is a plain polymodal `Decoder` kept whole under `decoder.` (its state-dict keys unchanged, so a
decoder checkpoint loads into it as is); the cross-attention blocks run through the decoder's
`before_layer` hook. Media are encoded once per call; with a cache, the cross-attention K/V and each
row's latest media are kept for the decode steps, which get no media.

Shapes: B batch, S text tokens, N media per sample, F frames, V features per frame, n latents, D width.
"""

from __future__ import annotations


import torch
from torch import nn

from polymodal.encoders.vit import ViT
from polymodal.errors import InputError, check_finite, check_ids
from polymodal.families.flamingo.config import FlamingoConfig
from polymodal.families.flamingo.cross_attention import gated_cross_attention_block
from polymodal.fusion.perceiver import build_resampler
from polymodal.fusion import early as fusion
from polymodal.models.parts import set_trainable
from polymodal.nn.cache import Cache
from polymodal.nn.language_model import LanguageModel
from polymodal.nn.masks import make_segments, media_attention_mask, media_ids
from polymodal.nn.transformer import Decoder, ModelOutput


class FlamingoCache(Cache):
    """A decoder cache plus the cross-attention state of a generate call: the media K/V (`cross_kv(j)`),
    the media each row's next tokens attend to, and the media layout (N media of L tokens)."""

    media_ids: torch.Tensor | None = None  # (B, 1); None: the prompt had no media
    media_layout: tuple[int, int] = (0, 0)  # N media of L tokens each


class Flamingo(LanguageModel, nn.Module):
    def __init__(self, config: FlamingoConfig, *, backend: str = "sdpa"):
        super().__init__()
        cfg = self.config = config
        self.vision = ViT(cfg.vision) if cfg.vision is not None else None
        self.perceiver = build_resampler(cfg.feature_dim, cfg.perceiver) if cfg.perceiver is not None else None
        t = cfg.text
        self.cross_layers = nn.ModuleList(
            gated_cross_attention_block(t.dim, cfg.feature_dim, cfg.xattn_heads, None, t.hidden_dim, mlp=t.mlp,
                                        norm=t.norm, eps=t.norm_eps, qk_norm=cfg.cross_attn_qk_norm, gate=cfg.gate,
                                        dropout=t.dropout, backend=backend)
            for _ in range(cfg.n_cross_layers))
        for module in (self.perceiver, self.cross_layers):
            if module is not None:
                module.apply(self._init_weights)
        self.decoder = Decoder(t, backend=backend)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def trainable(self, parts: tuple[str, ...] | list[str]) -> None:
        """Train exactly these parts (any of "vision", "perceiver", "cross_layers", "decoder"); freeze the rest."""
        set_trainable({"vision": [self.vision], "perceiver": [self.perceiver], "cross_layers": [self.cross_layers],
                       "decoder": [self.decoder]}, parts)

    def freeze(self) -> None:
        """The paper's split: the LM and the vision encoder frozen, the perceiver and the gated
        cross-attention blocks trained."""
        self.trainable(("perceiver", "cross_layers"))

    def make_cache(self, batch: int, max_len: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> FlamingoCache:
        t = self.config.text
        if max_len > t.max_seq_len:
            raise InputError(f"a cache of {max_len} tokens exceeds max_seq_len={t.max_seq_len}")
        w = self.decoder.tok_embeddings.weight
        return FlamingoCache(batch, max_len, t.n_layers, t.kv_heads, t.head_size, dtype or w.dtype, device or w.device)

    def encode_media(self, *, pixel_values: torch.Tensor | None = None,
                     image_encoder_embeddings: torch.Tensor | None = None,
                     perceiver_embeddings: torch.Tensor | None = None,
                     media_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Exactly one of: pixel_values (B, N, 3, H, W) or video frames (B, N, F, 3, H, W);
        image_encoder_embeddings (B, N, V, D) or (B, N, F, V, D); perceiver_embeddings (B, N, n, D).
        Returns the media tokens the text cross-attends to, (B, N, L, D)."""
        given = [k for k, v in (("pixel_values", pixel_values), ("image_encoder_embeddings", image_encoder_embeddings),
                                ("perceiver_embeddings", perceiver_embeddings)) if v is not None]
        if len(given) != 1:
            raise InputError(f"give exactly one of pixel_values, image_encoder_embeddings, perceiver_embeddings; "
                             f"got {given or 'none'}")
        D, dtype = self.config.feature_dim, self.decoder.tok_embeddings.weight.dtype
        if perceiver_embeddings is not None:
            if self.perceiver is None:
                raise InputError("this model has no perceiver; give image_encoder_embeddings or pixel_values")
            feats = perceiver_embeddings
            if feats.dim() != 4 or feats.shape[2:] != (self.config.perceiver.n_latents, D):
                raise InputError(f"perceiver_embeddings must be (B, N, {self.config.perceiver.n_latents}, {D}), "
                                 f"got shape {tuple(feats.shape)}")
            check_finite("perceiver_embeddings", feats)
            return feats.to(dtype)
        if pixel_values is not None:
            feats = self.encode_images(pixel_values)
        else:
            feats = image_encoder_embeddings
            if feats.dim() not in (4, 5) or feats.shape[-1] != D:
                raise InputError(f"image_encoder_embeddings must be (B, N, V, {D}) or (B, N, F, V, {D}), "
                                 f"got shape {tuple(feats.shape)}")
            check_finite("image_encoder_embeddings", feats)
            feats = feats.to(dtype)
        if self.perceiver is not None:
            return self.perceiver(feats, media_mask)
        if feats.dim() == 5:
            if feats.shape[2] != 1:
                raise InputError(f"without a perceiver, media must be single images; got {feats.shape[2]} frames")
            feats = feats.squeeze(2)
        return feats

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, N, 3, H, W) or (B, N, F, 3, H, W) -> vision features (B, N, [F,] V, D)."""
        if self.vision is None:
            raise InputError("this model has no vision encoder; give image_encoder_embeddings or perceiver_embeddings")
        v = self.config.vision
        image = (v.channels, v.image_size, v.image_size)
        if pixel_values.dim() not in (5, 6) or tuple(pixel_values.shape[-3:]) != image:
            raise InputError(f"pixel_values must be (B, N, {', '.join(map(str, image))}) or (B, N, F, "
                             f"{', '.join(map(str, image))}), got shape {tuple(pixel_values.shape)}")
        lead = pixel_values.shape[:-3]
        feats = self.vision(pixel_values.flatten(0, len(lead) - 1)).features  # (B*N*F, V, D)
        return feats.unflatten(0, lead)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                media_locations: torch.Tensor | None = None, media_mask: torch.Tensor | None = None,
                image_attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None, image_encoder_embeddings: torch.Tensor | None = None,
                perceiver_embeddings: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: FlamingoCache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (B, S); media as in `encode_media`, in the order they appear in the text.
        media_locations (B, S) bool: the token where each media starts (default: input_ids == media_token_id);
        row b must mark as many media as it has (media_mask (B, N) bool, valid media first).
        image_attention_mask (B, S, N): HF Idefics' form instead of media_locations, 1 where a token sees a
        media; each token may see at most one (Flamingo's rule: the latest before it).
        attention_mask / position_ids / document_ids / labels / logits_to_keep: as in `Decoder.forward`.
        cache: a `make_cache` cache; the first call encodes the media, later calls (decode) take none."""
        check_ids(input_ids)
        B, S = input_ids.shape
        if S > self.config.text.max_seq_len:
            raise InputError(f"sequence of {S} tokens exceeds max_seq_len={self.config.text.max_seq_len}")
        media_inputs = (("pixel_values", pixel_values), ("image_encoder_embeddings", image_encoder_embeddings),
                        ("perceiver_embeddings", perceiver_embeddings))
        given = {k: v for k, v in media_inputs if v is not None}
        if len(given) > 1:
            raise InputError(f"give exactly one of pixel_values, image_encoder_embeddings, perceiver_embeddings; "
                             f"got {list(given)}")
        decoding = fusion.decoding(cache, **given, media_locations=media_locations, media_mask=media_mask,
                                   image_attention_mask=image_attention_mask)
        if decoding:
            if any(t is not None for t in (attention_mask, document_ids, position_ids)):
                raise InputError("a cache that holds tokens continues each row causally; attention_mask, "
                                 "document_ids and position_ids apply to the first call only")
            seg = cache.next_segments(S)
            media, layout = None, cache.media_layout
            ids = None if cache.media_ids is None else cache.media_ids.expand(B, S)
        else:
            self.decoder.check_token_ids(input_ids)
            seg = make_segments(B, S, input_ids.device, attention_mask=attention_mask, document_ids=document_ids,
                                position_ids=position_ids)
            if image_attention_mask is not None and media_locations is not None:
                raise InputError("give media_locations or image_attention_mask (HF's form), not both")
            media, ids, layout = self._prefill_media(input_ids, given, media_locations, media_mask,
                                                     seg.docs if document_ids is not None else None,
                                                     image_attention_mask)
            if cache is not None:  # the engine left-aligns, so each row's last token is real
                cache.media_ids, cache.media_layout = (None if ids is None else ids[:, -1:]), layout
        mask, sees = media_attention_mask(ids, *layout) if ids is not None else (None, None)
        every = self.config.cross_attn_every

        def cross_attend(i: int, x: torch.Tensor) -> torch.Tensor:
            if i % every:
                return x
            kv_cache = cache.cross_kv(i // every) if cache is not None else None
            return self.cross_layers[i // every](x, media, mask=mask, sees_media=sees, cache=kv_cache)

        plain_causal = not decoding and all(t is None for t in (attention_mask, document_ids))
        h = self.decoder.hidden_states(self.decoder.tok_embeddings(input_ids), seg, cache=cache,
                                       plain_causal=plain_causal, before_layer=cross_attend)
        return self.decoder.head(h, labels, logits_to_keep)

    def _prefill_media(self, input_ids: torch.Tensor, given: dict[str, torch.Tensor],
                       media_locations: torch.Tensor | None, media_mask: torch.Tensor | None,
                       docs: torch.Tensor | None, image_attention_mask: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[int, int]]:
        """Checks the media against the text, then encodes them once. Returns the media tokens (B, N*L, D),
        each text token's media id (B, S) and the layout (N, L); Nones and (0, 0) without media."""
        if not given:
            if media_locations is not None and media_locations.any():
                raise InputError(f"media_locations marks {int(media_locations.sum())} media, but no media were given")
            if image_attention_mask is not None and image_attention_mask.any():
                raise InputError("image_attention_mask lets tokens see media, but no media were given")
            return None, None, (0, 0)
        (name, raw), = given.items()
        if raw.dim() < 4 or raw.shape[0] != input_ids.shape[0]:
            raise InputError(f"{name} must start with (batch={input_ids.shape[0]}, n_media), "
                             f"got shape {tuple(raw.shape)}")
        if image_attention_mask is not None:
            ids = self._ids_from_hf_mask(input_ids, image_attention_mask, raw.shape[1])
        else:
            ids = media_ids(self._media_locations(input_ids, media_locations, media_mask, raw.shape[1]), docs)
        if self.perceiver is not None and name != "perceiver_embeddings":
            video = raw.dim() == (6 if name == "pixel_values" else 5)
            self.perceiver.check_media(raw.shape[1], raw.shape[2] if video else 1)
        feats = self.encode_media(**given, media_mask=media_mask)  # (B, N, L, D)
        return feats.flatten(1, 2), ids, tuple(feats.shape[1:3])

    @staticmethod
    def _ids_from_hf_mask(input_ids: torch.Tensor, image_attention_mask: torch.Tensor, n_media: int) -> torch.Tensor:
        """HF's image_attention_mask (B, S, N) -> each token's 1-based media id (0: none), as `media_ids` gives."""
        expected = (*input_ids.shape, n_media)
        if tuple(image_attention_mask.shape) != expected:
            raise InputError(f"image_attention_mask must be (batch, seq, n_media) = {expected}, "
                             f"got {tuple(image_attention_mask.shape)}")
        sees = image_attention_mask.bool()
        counts = sees.sum(-1)
        if (counts > 1).any():
            b, t = (counts > 1).nonzero()[0].tolist()
            raise InputError(f"image_attention_mask lets token {t} of row {b} see {int(counts[b, t])} media; Flamingo "
                             "lets each token see at most one (the latest before it)")
        return (sees.long().argmax(-1) + 1) * sees.any(-1)

    def _media_locations(self, input_ids: torch.Tensor, media_locations: torch.Tensor | None,
                         media_mask: torch.Tensor | None, n_media: int) -> torch.Tensor:
        """Checks that every row marks exactly as many media as it was given, before any compute on text."""
        B = input_ids.shape[0]
        if media_locations is None:
            if self.config.media_token_id is None:
                raise InputError("give media_locations (B, S) bool, or set media_token_id in the config")
            media_locations = input_ids == self.config.media_token_id
        elif media_locations.shape != input_ids.shape:
            raise InputError(f"media_locations must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(media_locations.shape)}")
        media_locations = media_locations.bool()
        if media_mask is None:
            counts = torch.full((B,), n_media, device=input_ids.device)
        else:
            media_mask = media_mask.bool()
            if media_mask.shape != (B, n_media):
                raise InputError(f"media_mask must have shape {(B, n_media)}, got {tuple(media_mask.shape)}")
            if (media_mask[:, 1:] & ~media_mask[:, :-1]).any():
                raise InputError("media_mask must list each row's media first and its padding after")
            counts = media_mask.sum(1)
        marked = media_locations.sum(1)
        if not torch.equal(marked, counts.to(marked)):
            raise InputError(f"each row must mark as many media as it is given: marked {marked.tolist()}, "
                             f"given {counts.tolist()}")
        return media_locations
