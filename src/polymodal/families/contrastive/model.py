"""Contrastive dual encoders: CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023).

An image tower (the ViT) and a text tower (`encoders/text.py`) map images and texts to unit
vectors; logits are cosine similarities times a learned temperature exp(logit_scale), plus a
learned bias for SigLIP. Matches HF `CLIPModel` and `SiglipModel` (embeddings, logits, losses).

Losses, each a mean over this process's images:
  softmax  CLIP's symmetric cross-entropy; the temperature is capped at 100 as in CLIP (HF does not
           cap it, so the two agree while exp(logit_scale) <= 100)
  sigmoid  SigLIP's -sum_j log sigmoid(z_ij * logit_ij), z = +1 for the pair i, -1 otherwise
The sigmoid loss runs over blocks of texts with a hand-written backward that recomputes each
block, so memory is one (images x block) matrix. With `all_ranks` the texts go round a ring of
processes (SigLIP §3.3, "chunked" implementation): each rank's images meet every rank's texts and
the texts' gradients travel the ring home. Per-rank losses are local means, so gradients averaged
over ranks (as DDP and FSDP average them) are exactly those of the loss on the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.text import TextTransformer
from polymodal.encoders.vit import ViT
from polymodal.errors import InputError
from polymodal.families.contrastive.config import ContrastiveConfig
from polymodal.models.parts import set_trainable
from polymodal.nn.collectives import all_gather_with_grad, ring_shift

MAX_SCALE = 100.0  # CLIP: "clipped to prevent scaling the logits by more than 100"


@dataclass
class ContrastiveOutput:
    logits_per_image: torch.Tensor  # (N_img, N_txt)
    logits_per_text: torch.Tensor  # (N_txt, N_img)
    image_embeds: torch.Tensor  # (N_img, D), unit norm
    text_embeds: torch.Tensor  # (N_txt, D), unit norm
    loss: torch.Tensor | None = None


class DualEncoder(nn.Module):
    def __init__(self, config: ContrastiveConfig):
        super().__init__()
        cfg = self.config = config
        self.vision = ViT(cfg.vision)
        self.text = TextTransformer(cfg.text)
        p = cfg.projection_dim
        self.visual_projection = nn.Linear(cfg.vision.dim, p, bias=False) if p else None
        self.text_projection = nn.Linear(cfg.text.out_dim, p, bias=False) if p else None
        # shaped as the references store them: CLIP a scalar, SigLIP (big_vision) a 1-vector
        shape = () if cfg.loss == "softmax" else (1,)
        self.logit_scale = nn.Parameter(torch.full(shape, cfg.logit_scale_init))
        self.logit_bias = nn.Parameter(torch.full((1,), cfg.logit_bias_init)) if cfg.loss == "sigmoid" else None

    def trainable(self, parts: tuple[str, ...] | list[str]) -> None:
        """Train exactly these parts (any of "vision", "text", "head"); freeze the rest (LiT: ["text", "head"])."""
        set_trainable({"vision": [self.vision], "text": [self.text],
                       "head": [self.visual_projection, self.text_projection, self.logit_scale, self.logit_bias]}, parts)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, D) unit vectors."""
        x = self.vision(pixel_values, pooled=True).pooled
        if self.visual_projection is not None:
            x = self.visual_projection(x)
        return F.normalize(x, dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, S) -> (N, D) unit vectors."""
        x = self.text(input_ids, attention_mask).pooled
        if self.text_projection is not None:
            x = self.text_projection(x)
        return F.normalize(x, dim=-1)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(N_txt, N_img) logits of unit embeddings."""
        logits = text_embeds @ image_embeds.T * temperature(self.logit_scale, self.config.loss)
        return logits if self.logit_bias is None else logits + self.logit_bias

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *, return_loss: bool = True, chunks: int = 1, all_ranks: bool = False) -> ContrastiveOutput:
        """input_ids (N_txt, S), pixel_values (N_img, C, H, W), attention_mask (N_txt, S).
        return_loss: text i is image i's caption (N_txt == N_img); without a loss any counts pair up
        (zero-shot classification: images against one prompt per class).
        chunks: blocks of texts for the sigmoid loss (memory). all_ranks: the loss of this process's
        images against the texts of every process of the default group (logits stay local)."""
        self.vision.check_pixels(pixel_values)
        self.text.check_inputs(input_ids, attention_mask)
        if return_loss:
            _check_pairs(pixel_values.shape[0], input_ids.shape[0])
            if self.config.loss == "softmax" and chunks != 1:
                raise InputError(f"chunks applies to the sigmoid loss; this model's loss is softmax, "
                                 f"got chunks={chunks}")
        image_embeds = self.encode_image(pixel_values)
        text_embeds = self.encode_text(input_ids, attention_mask)
        logits_per_text = self.logits(image_embeds, text_embeds)
        loss = None
        if return_loss and self.config.loss == "softmax":
            loss = softmax_loss(image_embeds, text_embeds, self.logit_scale, all_ranks=all_ranks)
        elif return_loss:
            loss = sigmoid_loss(image_embeds, text_embeds, self.logit_scale, self.logit_bias, chunks=chunks,
                                all_ranks=all_ranks)
        return ContrastiveOutput(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                                 image_embeds=image_embeds, text_embeds=text_embeds, loss=loss)


def temperature(logit_scale: torch.Tensor, loss: str) -> torch.Tensor:
    scale = logit_scale.exp()
    return scale.clamp(max=MAX_SCALE) if loss == "softmax" else scale


def _check_pairs(n_images: int, n_texts: int) -> None:
    if n_images != n_texts:
        raise InputError(f"the contrastive loss pairs image i with text i, so it needs as many images as texts; "
                         f"got {n_images} images and {n_texts} texts")


def _world(all_ranks: bool, group: dist.ProcessGroup | None) -> int:
    """Processes taking part; 1 without a process group, so one script runs alone or under torchrun."""
    if not (all_ranks and dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _check_same_batch(n: int, device: torch.device, group: dist.ProcessGroup | None) -> None:
    sizes = all_gather_with_grad(torch.tensor([n], device=device), group).tolist()
    if len(set(sizes)) > 1:
        raise InputError(f"a loss over all ranks needs the same number of pairs on every rank; got {sizes} "
                         "(in rank order)")


def softmax_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, *,
                 all_ranks: bool = False, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """CLIP's loss: the mean of the image->text and text->image cross-entropies, pairs on the diagonal.
    all_ranks: this rank's images and texts against every rank's (gathered with gradients)."""
    _check_pairs(image_embeds.shape[0], text_embeds.shape[0])
    n = image_embeds.shape[0]
    labels = torch.arange(n, device=image_embeds.device)
    images, texts = image_embeds, text_embeds
    if _world(all_ranks, group) > 1:
        _check_same_batch(n, image_embeds.device, group)
        images, texts = all_gather_with_grad(image_embeds, group), all_gather_with_grad(text_embeds, group)
        labels = labels + dist.get_rank(group) * n
    scale = temperature(logit_scale, "softmax")
    per_image = _acc(image_embeds @ texts.T * scale)  # (n, N)
    per_text = _acc(text_embeds @ images.T * scale)  # (n, N)
    return (F.cross_entropy(per_text, labels) + F.cross_entropy(per_image, labels)) / 2


def sigmoid_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor | None, *, chunks: int = 1, all_ranks: bool = False,
                 group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """SigLIP's loss: -1/n sum_ij log sigmoid(z_ij (exp(logit_scale) x_i.y_j + logit_bias)), z_ii = 1,
    else -1. chunks: texts are taken in this many blocks. all_ranks: this rank's images against the
    texts of every rank of `group` (default: all), passed round a ring."""
    _check_pairs(image_embeds.shape[0], text_embeds.shape[0])
    if not isinstance(chunks, int) or chunks < 1:
        raise InputError(f"chunks must be a positive int, got {chunks!r}")
    world = _world(all_ranks, group)
    if world > 1:
        _check_same_batch(image_embeds.shape[0], image_embeds.device, group)
    return _SigmoidLoss.apply(image_embeds, text_embeds, logit_scale.exp(), logit_bias, chunks, world, group)


def _blocks(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
            chunks: int, paired: bool):
    """For each block of texts: (its span, the block, similarities, logits, signs z), at least float32.
    paired: these are the images' own texts, so text i is image i's positive."""
    n = texts.shape[0]
    size = -(-n // chunks)
    rows = torch.arange(images.shape[0], device=images.device)
    for start in range(0, n, size):
        block = _acc(texts[start:start + size])
        sim = images @ block.T  # (n_img, block)
        logits = sim * scale if bias is None else sim * scale + bias
        cols = torch.arange(start, start + block.shape[0], device=images.device)
        positive = (rows[:, None] == cols[None, :]) & paired
        yield slice(start, start + block.shape[0]), block, sim, logits, positive.to(sim.dtype) * 2 - 1


class _SigmoidLoss(torch.autograd.Function):
    """Blockwise and ring-distributed; backward recomputes each block instead of storing it. Autocast
    is off inside: the blocks stay in float32 (or wider) under AMP."""

    @staticmethod
    def forward(ctx, images, texts, scale, bias, chunks, world, group):
        ctx.save_for_backward(images, texts, scale, bias)
        ctx.chunks, ctx.world, ctx.group = chunks, world, group
        with torch.autocast(images.device.type, enabled=False):
            img, s, b = _acc(images), _acc(scale), _acc(bias)
            total = img.new_zeros(())
            here = texts  # the texts of rank (rank - step) at each step
            for step in range(world):
                if step < world - 1:  # the next rank's texts travel while this block computes
                    incoming, requests = ring_shift(here, group)
                for _, _, _, logits, z in _blocks(img, here, s, b, chunks, step == 0):
                    total -= F.logsigmoid(z * logits).sum()
                if step < world - 1:
                    _wait(requests)
                    here = incoming
        return total / images.shape[0]

    @staticmethod
    def backward(ctx, grad):
        images, texts, scale, bias = ctx.saved_tensors
        with torch.autocast(images.device.type, enabled=False):
            img, s, b = _acc(images), _acc(scale), _acc(bias)
            coef = _acc(grad) / images.shape[0]
            d_img, d_scale, d_bias = torch.zeros_like(img), img.new_zeros(()), img.new_zeros(())
            here, d_here = texts, torch.zeros_like(texts, dtype=img.dtype)
            for step in range(ctx.world):
                if step < ctx.world - 1:
                    incoming, requests = ring_shift(here, ctx.group)
                for span, block, sim, logits, z in _blocks(img, here, s, b, ctx.chunks, step == 0):
                    g = -coef * z * torch.sigmoid(-z * logits)  # d loss / d logits, (n_img, block)
                    d_img += s * (g @ block)
                    d_here[span] += s * (g.T @ img)
                    d_scale += (g * sim).sum()
                    d_bias += g.sum()
                if ctx.world > 1:  # the texts' gradient travels with them; after `world` hops it is home
                    d_here, d_requests = ring_shift(d_here, ctx.group)
                    _wait(d_requests)
                if step < ctx.world - 1:
                    _wait(requests)
                    here = incoming
        return (d_img.to(images.dtype), d_here.to(texts.dtype), d_scale.reshape(scale.shape).to(scale.dtype),
                None if bias is None else d_bias.reshape(bias.shape).to(bias.dtype), None, None, None)


def _acc(x: torch.Tensor | None) -> torch.Tensor | None:
    """x in float32 or wider: the loss sums many terms, bf16 would lose them."""
    return None if x is None else x.to(torch.promote_types(x.dtype, torch.float32))


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()
