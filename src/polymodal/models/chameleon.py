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

import PIL.Image
import torch

from polymodal.config import DecoderConfig
from polymodal.encoders.vq import VQConfig, VQModel
from polymodal.errors import InputError, check_pixel_values
from polymodal.fusion.configs import ChameleonConfig
from polymodal.models import fusion
from polymodal.models.constraints import ImageSpans
from polymodal.models.drawing import decode_rows
from polymodal.nn.cache import Cache
from polymodal.nn.meta import ComputedBuffers
from polymodal.nn.transformer import Decoder, ModelOutput
from polymodal.nn.language_model import LanguageModel


class Chameleon(LanguageModel, ComputedBuffers):
    def __init__(self, config: ChameleonConfig, *, backend: str = "sdpa"):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config.text, backend=backend)
        self.vq = VQModel(config.vq)
        self.vq.requires_grad_(False)  # trained on its own first, then frozen (as in Chameleon)
        self.register_computed()

    def computed(self) -> dict[str, torch.Tensor]:
        return {"code_tokens": torch.tensor(self.config.code_tokens)}

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
                raise InputError("this model has no image_token_id, so input_ids cannot place pixel_values")
            return input_ids, labels
        if pixel_values is not None:  # the shape first: a (3, H, W) image would read as 3 images
            check_pixel_values(pixel_values, self.config.vq.in_channels, self.config.vq.resolution)
        spans = fusion.runs(input_ids == placeholder)
        n_images, per_image = 0 if pixel_values is None else pixel_values.shape[0], self.config.vq.tokens_per_image
        fusion.check_total(spans, n_images * per_image, f"image placeholder tokens ({placeholder})",
                           f"{n_images} image(s) need {n_images * per_image} ({per_image} each)")
        if pixel_values is None:
            return input_ids, labels
        input_ids = fusion.scatter(input_ids, spans, self.image_token_ids(pixel_values).flatten())
        if labels is not None:
            labels = torch.where(labels == placeholder, input_ids, labels)
        return input_ids, labels

    def forward(self, input_ids: torch.Tensor, *, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: Cache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (B, S) with `image_token_id` placeholders for pixel_values (N, 3, H, W) in [-1, 1]
        (images in row-major order of their placeholders); labels as in `Decoder`, placeholders allowed.
        The images enter as their code tokens, so the decoder runs on token ids as a text model does."""
        if not fusion.decoding(cache, pixel_values=pixel_values):
            fusion.check_inputs(self.decoder, input_ids, labels=labels)
            input_ids, labels = self.splice_images(input_ids, pixel_values, labels)
        return self.decoder(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            document_ids=document_ids, labels=labels, cache=cache, logits_to_keep=logits_to_keep)


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

