"""KOSMOS-1 (Huang et al. 2023, "Language Is Not All You Need"): a Magneto decoder that reads images
anywhere in its text.

A CLIP ViT encodes each image; its patch features (post-LN, as Kosmos-2 takes them) go through a
Perceiver Resampler (Flamingo's, e.g. 256 patches -> 64 latents) and a linear projection to the
text width, and the result replaces the placeholders of that image in the token embeddings:

    <s> <image> [n_image_latents placeholders] </image> text <image> [...] </image> text </s>

Any number of images per document, at any place; the decoder is causal over everything. The text
decoder is torchscale's `Decoder(subln=True, xpos_rel_pos=True)` (Magneto: sub-LN, Magneto init,
xPos) expressed as a polymodal `DecoderConfig`; `convert/torchscale.py` loads its weights.

Input contract: `input_ids` (B, S) hold, for every image, `image_token_id`, then n_image_latents
placeholder tokens (any id but the two image ids; `image_tokens()` writes `placeholder_token_id`),
then `image_end_token_id`. `pixel_values` (N, 3, H, W) holds all N images of the batch in order of
appearance (row by row, left to right). Labels on placeholders are ignored: loss goes on text only.

Shapes: B batch, S tokens, N images in the batch, P patches, n latents, Dv / D vision / text width.
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.config import DecoderConfig
from polymodal.encoders.vit import ViT, VisionConfig
from polymodal.errors import InputError
from polymodal.fusion.configs import KosmosConfig
from polymodal.fusion.perceiver import PerceiverConfig, build_resampler
from polymodal.models import fusion
from polymodal.models.parts import set_trainable
from polymodal.nn.cache import Cache
from polymodal.nn.transformer import Decoder, ModelOutput
from polymodal.nn.language_model import LanguageModel

IGNORE = -100


class Kosmos(LanguageModel, nn.Module):
    def __init__(self, config: KosmosConfig, *, backend: str = "sdpa"):
        super().__init__()
        cfg = self.config = config
        self.vision = ViT(cfg.vision)
        self.perceiver = build_resampler(cfg.vision.dim, cfg.perceiver)
        # Starts as the decoder's own linear layers do (PyTorch's default under Magneto's init); it
        # feeds the embeddings, not a residual branch, so it takes no sqrt(log 2N) gain.
        self.projector = nn.Linear(cfg.vision.dim, cfg.text.dim, bias=cfg.projector_bias)
        if cfg.text.init == "normal":
            nn.init.normal_(self.projector.weight, std=cfg.text.init_std)
            if cfg.projector_bias:
                nn.init.zeros_(self.projector.bias)
        self.decoder = Decoder(cfg.text, backend=backend)

    def make_cache(self, batch: int, max_len: int, **kwargs) -> Cache:
        return self.decoder.make_cache(batch, max_len, **kwargs)

    def trainable(self, parts: tuple[str, ...] | list[str]) -> None:
        """Train exactly these parts (any of "vision", "perceiver", "projector", "decoder"); freeze the rest.
        KOSMOS-1 kept its CLIP frozen (but for the last layer): ["perceiver", "projector", "decoder"]."""
        set_trainable({"vision": [self.vision], "perceiver": [self.perceiver], "projector": [self.projector],
                       "decoder": [self.decoder]}, parts)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, n_image_latents, D): what replaces each image's placeholders."""
        feats = self.vision(pixel_values).features[:, 1:]  # (N, P, Dv): patches; CLIP's class token dropped
        latents = self.perceiver(self.vision.post_norm(feats)[:, None])[:, 0]  # (N, n, Dv)
        return self.projector(latents)

    def media_spans(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> fusion.Spans:
        """Checks the image layout of input_ids against pixel_values before any compute; returns each
        image's placeholders, in order of appearance."""
        cfg, n = self.config, self.config.n_image_latents
        S = input_ids.shape[1]
        rows, starts = (input_ids == cfg.image_token_id).nonzero(as_tuple=True)  # row-major: order of appearance
        N = len(rows)
        given = 0 if pixel_values is None else pixel_values.shape[0]
        if N != given:
            raise InputError(f"input_ids hold {N} images (<image> tokens, id {cfg.image_token_id}) but pixel_values "
                             f"holds {given} images" + (" (none given)" if pixel_values is None else ""))
        if pixel_values is not None:
            self.vision.check_pixels(pixel_values)
        ends = starts + n + 1  # where each image's </image> must be
        limit = cfg.text.max_seq_len
        if S > limit and (ends >= limit).any():
            past = [f"image {k} (row {int(rows[k])}, tokens {int(starts[k])}..{int(ends[k])})"
                    for k in (ends >= limit).nonzero()[:, 0].tolist()]
            raise InputError(f"{', '.join(past[:5])}{' and more' if len(past) > 5 else ''} "
                             f"{'lies' if len(past) == 1 else 'lie'} past the context limit of max_seq_len={limit} "
                             f"tokens (the input has {S}); shorten the document or drop those images")
        if (ends >= S).any():
            k = int((ends >= S).nonzero()[0, 0])
            raise InputError(f"image {k} (row {int(rows[k])}) starts at token {int(starts[k])} and needs tokens up to "
                             f"{int(ends[k])} (<image>, {n} placeholders, </image>), but the input ends at token "
                             f"{S - 1}: was it cut at the context limit?")
        if N:
            found = input_ids[rows, ends]
            if (found != cfg.image_end_token_id).any():
                k = int((found != cfg.image_end_token_id).nonzero()[0, 0])
                raise InputError(f"image {k} (row {int(rows[k])}, <image> at token {int(starts[k])}) needs </image> "
                                 f"(id {cfg.image_end_token_id}) at token {int(ends[k])} after its {n} placeholders, "
                                 f"got id {int(found[k])}")
        n_ends = int((input_ids == cfg.image_end_token_id).sum())
        if n_ends != N:
            raise InputError(f"input_ids hold {n_ends} </image> tokens for {N} images; every image is "
                             f"<image>, {n} placeholders, </image>")
        return fusion.Spans(rows, starts + 1, torch.full_like(rows, n), torch.zeros_like(rows))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: Cache | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (B, S) and pixel_values (N, 3, H, W) as in the module docstring; attention_mask /
        position_ids / document_ids / labels / cache / logits_to_keep as in `Decoder.forward`.
        With a cache, the first call (prefill) encodes the images once; decode steps take none."""
        if fusion.decoding(cache, pixel_values=pixel_values):
            return self.decoder(input_ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids,
                                document_ids=document_ids, labels=labels, logits_to_keep=logits_to_keep)
        fusion.check_inputs(self.decoder, input_ids, within_context=False)
        spans = self.media_spans(input_ids, pixel_values)  # names images past the context before the length check
        fusion.check_length(self.decoder, input_ids)
        embeds = self.decoder.tok_embeddings(input_ids)
        if pixel_values is not None:
            embeds = fusion.scatter(embeds, spans, self.embed_images(pixel_values).flatten(0, 1))  # (B, S, D)
            if labels is not None:
                labels = fusion.scatter(labels, spans, torch.tensor(IGNORE))
        return fusion.prefill(self.decoder, embeds, attention_mask=attention_mask, document_ids=document_ids,
                              position_ids=position_ids, labels=labels, cache=cache, logits_to_keep=logits_to_keep)


# -- presets -------------------------------------------------------------------------------------

def magneto_text(**changes) -> DecoderConfig:
    """torchscale's Decoder(subln=True, xpos_rel_pos=True) with KOSMOS-1's choices: biased
    projections, GELU FFN, LayerNorm (eps 1e-5), sqrt(dim) embedding scale, tied output head."""
    base = dict(mlp="gelu", norm="layernorm", norm_eps=1e-5, norm_placement="sub", positions="xpos",
                attn_bias=True, mlp_bias=True, tie_embeddings=True, embed_scale=True, init="magneto")
    return DecoderConfig(**{**base, **changes})


def kosmos_tiny() -> KosmosConfig:
    """Fast on a CPU: 32x32 images, 16 patches -> 8 latents; ids of `Tokenizer.train`'s control tokens."""
    return KosmosConfig(
        vision=VisionConfig(variant="clip", image_size=32, patch_size=8, dim=64, n_layers=2, n_heads=4, hidden_dim=128),
        perceiver=PerceiverConfig(depth=1, n_heads=4, head_dim=16, n_latents=8),
        text=magneto_text(vocab_size=512, dim=64, n_layers=2, n_heads=4, hidden_dim=256, max_seq_len=512,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2),
    )


def kosmos_1() -> KosmosConfig:
    """The paper's model: CLIP ViT-L/14 at 224 (256 patches) -> a resampler (depth 2, 8 heads) to 64 latents
    -> a bias-free linear map -> a 24-layer, 2048-wide Magneto decoder (32 heads, FFN 8192, 2048 tokens of
    context, dropout and attention dropout 0.1 in training). 1.67B parameters: the paper's "about 1.6B".
    The output projection is tied to the embeddings: unilm's `unigptmodel_xl` (KOSMOS' code) goes through
    fairseq's `base_gpt3_architecture`, which sets `share_decoder_input_output_embed`; an untied one would
    add 131M (1.80B, past the paper's figure). The vocabulary is its 64k SentencePiece one, fairseq ids
    <s>=0, <pad>=1, </s>=2; the image ids are taken from the tokenizer by the data format."""
    return KosmosConfig(
        vision=VisionConfig(variant="clip", image_size=224, patch_size=14, dim=1024, n_layers=24, n_heads=16,
                            hidden_dim=4096),
        perceiver=PerceiverConfig(depth=2, n_heads=8, head_dim=128, n_latents=64),
        text=magneto_text(vocab_size=64007, dim=2048, n_layers=24, n_heads=32, hidden_dim=8192, max_seq_len=2048,
                          dropout=0.1, bos_token_id=0, pad_token_id=1, eos_token_id=2),
        image_token_id=64005, image_end_token_id=64006, placeholder_token_id=1, projector_bias=False,
    )
