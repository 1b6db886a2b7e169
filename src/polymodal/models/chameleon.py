"""Chameleon (Chameleon Team 2024, "Mixed-modal early-fusion foundation models"): one decoder over
text tokens and discrete image tokens from a VQ image tokenizer, reading and writing both.

An image in the token stream is `<img>` (HF `<racm3:break>`), its VQ codes as vocabulary tokens, then
`</img>` (HF `<eoss>`). Input images come as `pixel_values` with `image_token_id` placeholders in
`input_ids` (HF `<image>`), which the frozen VQ encoder fills with code tokens. Writing images goes
through the one generation engine: `image_spans` constrains each row's sampling to image codes for
exactly one image's worth of tokens after `<img>`, then forces `</img>`; `images_from_codes` decodes.

The decoder is Llama with a per-head LayerNorm qk-norm and optionally Swin-style res-post-norm; it
matches HF `ChameleonForConditionalGeneration` through `convert/hf_chameleon.py`, except that HF sets
image-code logits to the dtype minimum (its checkpoints have no VQ decoder, so they may not draw), while
here the logits are raw and the state machine masks image codes outside image spans, which gives HF's
text generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import PIL.Image
import torch
from torch import nn

from polymodal.config import Config, ConfigError, DecoderConfig
from polymodal.data.processors import check_pixel_values
from polymodal.encoders.vq import VQConfig, VQModel, images_to_pixels
from polymodal.generation.constraints import ImageSpans
from polymodal.models.drawing import decode_rows
from polymodal.nn.cache import Cache
from polymodal.nn.transformer import Decoder, ModelOutput


def _chameleon_text() -> DecoderConfig:
    return DecoderConfig(qk_norm="layernorm", qk_norm_per_head=True, norm_eps=1e-5)


@dataclass
class ChameleonConfig(Config):
    text: DecoderConfig = field(default_factory=_chameleon_text)
    vq: VQConfig = field(default_factory=VQConfig)
    image_tokens: int | list[int] = 256  # token id of VQ code 0 (codes contiguous from it), or the token of each code
    image_token_id: int | None = None  # input placeholder filled with an input image's codes (HF `<image>`)
    begin_image_id: int | None = None  # `<img>`; None (with end_image_id): the model never writes images
    end_image_id: int | None = None  # `</img>`

    def __post_init__(self) -> None:
        V, K = self.text.vocab_size, self.vq.num_embeddings
        if isinstance(self.image_tokens, int):
            if not 0 <= self.image_tokens <= V - K:
                raise ConfigError(f"image_tokens: the {K} image codes from token {self.image_tokens} must fit in "
                                  f"the vocabulary of {V}")
        else:
            tokens = self.image_tokens
            if len(tokens) != K or len(set(tokens)) != K or not all(0 <= t < V for t in tokens):
                raise ConfigError(f"image_tokens must list {K} distinct token ids in [0, {V}), one per VQ code; "
                                  f"got {len(tokens)} ids")
        codes = set(self.code_tokens)
        for name in ("image_token_id", "begin_image_id", "end_image_id"):
            value = getattr(self, name)
            if value is not None and (not 0 <= value < V or value in codes):
                raise ConfigError(f"{name} must be a token in [0, {V}) that is not an image code, got {value}")
        if (self.begin_image_id is None) != (self.end_image_id is None):
            raise ConfigError("give both begin_image_id and end_image_id, or neither")

    @property
    def code_tokens(self) -> list[int]:
        """The token id of each VQ code, in code order."""
        if isinstance(self.image_tokens, int):
            return list(range(self.image_tokens, self.image_tokens + self.vq.num_embeddings))
        return list(self.image_tokens)


class Chameleon(nn.Module):
    def __init__(self, config: ChameleonConfig, *, backend: str = "sdpa"):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config.text, backend=backend)
        self.vq = VQModel(config.vq)
        self.vq.requires_grad_(False)  # trained on its own first, then frozen (as in Chameleon)
        self.register_buffer("code_tokens", torch.tensor(config.code_tokens), persistent=False)

    @property
    def image_spans(self) -> ImageSpans:
        """The sampling state machine. Without a VQ decoder the model cannot draw, so it never opens
        an image and its codes stay masked: HF's text-only generation, token for token."""
        cfg = self.config
        begin, end = (cfg.begin_image_id, cfg.end_image_id) if cfg.vq.decoder else (None, None)
        return ImageSpans(begin, end, self.code_tokens, cfg.vq.tokens_per_image)

    def make_cache(self, batch: int, max_len: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> Cache:
        return self.decoder.make_cache(batch, max_len, dtype=dtype, device=device)

    @torch.no_grad()
    def image_token_ids(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, tokens_per_image) vocabulary ids of the images' VQ codes."""
        return self.code_tokens[self.vq.encode(pixel_values)]

    def images_from_codes(self, codes: list[list[torch.Tensor]]) -> list[list[PIL.Image.Image]]:
        """Per row, a list of code tensors (tokens_per_image,) -> per row, PIL images."""
        return decode_rows(self.vq, codes)

    def splice_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                      labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fill the image placeholders of input_ids with the images' code tokens, in order. Labels
        that hold the placeholder (an image the model learns to write) get the same code tokens."""
        placeholder = self.config.image_token_id
        if placeholder is None:
            if pixel_values is not None:
                raise ValueError("this model has no image_token_id, so input_ids cannot place pixel_values")
            return input_ids, labels
        if pixel_values is not None:  # the shape first: a (3, H, W) image would read as 3 images
            check_pixel_values(pixel_values, self.config.vq.in_channels, self.config.vq.resolution)
        is_image = input_ids == placeholder
        n_slots, n_images = int(is_image.sum()), 0 if pixel_values is None else pixel_values.shape[0]
        per_image = self.config.vq.tokens_per_image
        if n_slots != n_images * per_image:
            raise ValueError(f"input_ids hold {n_slots} image placeholder tokens ({placeholder}); {n_images} "
                             f"image(s) need {n_images * per_image} ({per_image} each)")
        if pixel_values is None:
            return input_ids, labels
        tokens = self.image_token_ids(pixel_values)  # (N, L)
        input_ids = input_ids.masked_scatter(is_image, tokens.flatten())
        if labels is not None:
            labels = torch.where(labels == placeholder, input_ids, labels)
        return input_ids, labels

    def forward(self, input_ids: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: Cache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (B, S) with `image_token_id` placeholders for pixel_values (N, 3, H, W) in [-1, 1]
        (images in row-major order of their placeholders); labels as in `Decoder`, placeholders allowed."""
        if cache is None or cache.length == 0:
            input_ids, labels = self.splice_images(input_ids, pixel_values, labels)
        return self.decoder(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            document_ids=document_ids, labels=labels, cache=cache, logits_to_keep=logits_to_keep)


class ChameleonFormat:
    """Documents -> Chameleon's stream: <bos>, then the segments in order, each text ended by "\\n" (the
    last by <eos>), each image `<img> <image>*n </img>` with its pixels (a last image is followed by
    <eos>). Target text and target images carry labels: the model learns to write both; a target
    image's placeholder labels become its code tokens inside the model (`Chameleon.splice_images`)."""

    def __init__(self, config: ChameleonConfig, tokenizer):
        from polymodal.data.collate import SEPARATOR

        if None in (config.image_token_id, config.begin_image_id, config.end_image_id):
            raise ConfigError("documents with images need image_token_id, begin_image_id and end_image_id")
        self.config, self.tokenizer = config, tokenizer
        self.sep = tokenizer.encode(SEPARATOR)
        self.max_len = config.text.max_seq_len

    @staticmethod
    def fit(config: ChameleonConfig, tokenizer) -> ChameleonConfig:
        """Text tokens from the tokenizer, then the VQ codes right after them."""
        from polymodal.data.collate import DecoderFormat

        V, ids = tokenizer.vocab_size, tokenizer.special_ids
        text = DecoderFormat.fit(config.text, tokenizer).replace(vocab_size=V + config.vq.num_embeddings)
        return config.replace(text=text, image_tokens=V, image_token_id=ids["<image>"],
                              begin_image_id=ids["<img>"], end_image_id=ids["</img>"])

    def encode(self, doc, prompt_only: bool = False):
        from polymodal.data.collate import Encoded, _labels, _name, _prompt

        cfg, tok = self.config, self.tokenizer
        segments = [(s, False) for s in _prompt(doc)] if prompt_only else list(zip(doc.segments, doc.target_mask))
        if unreadable := sorted({s.kind for s, _ in segments} - {"text", "image"}):
            raise ValueError(f"{_name(doc)} has {', '.join(unreadable)} segments; Chameleon reads images and text")
        pieces, images = [([tok.bos_id], False)], []
        for i, (seg, target) in enumerate(segments):
            last = i == len(segments) - 1 and not prompt_only
            if seg.kind == "text":
                text = tok.encode(seg.text, split_special_tokens=True)  # never a control token
                pieces += [(text, target), ([tok.eos_id] if last else self.sep, target)]
                continue
            span = [cfg.begin_image_id] + [cfg.image_token_id] * cfg.vq.tokens_per_image + [cfg.end_image_id]
            pieces += [(span, target)] + ([([tok.eos_id], target)] if last else [])
            images.append(seg.media)
        tokens = {"input_ids": [i for p, _ in pieces for i in p], "labels": _labels(pieces)}
        return Encoded(tokens, {"pixel_values": images_to_pixels(images, cfg.vq.resolution)} if images else {})


def chameleon_tiny() -> ChameleonConfig:
    """For tests and the built-in world: 32x32 images as 8x8 = 64 codes of a 128-entry codebook, held
    by the last 128 of 512 tokens; `<image>`, `<img>`, `</img>` are the built-in tokenizer's ids 4, 6, 7.
    Its VQ uses GroupNorm with 8 groups for speed; HF's Chameleon VQ fixes 32, so export needs norm_groups=32."""
    text = DecoderConfig(vocab_size=512, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=384,
                         qk_norm="layernorm", qk_norm_per_head=True, norm_eps=1e-5, max_seq_len=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vq = VQConfig(resolution=32, base_channels=16, channel_multiplier=[1, 2, 2], num_res_blocks=1, mid_attn=False,
                  latent_channels=32, embed_dim=32, num_embeddings=128, norm_groups=8)
    return ChameleonConfig(text=text, vq=vq, image_tokens=384, image_token_id=4, begin_image_id=6, end_image_id=7)

