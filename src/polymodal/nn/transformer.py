"""Transformer `Block` (pre-LN, post-LN, Magneto sub-LN, parallel) and the decoder-only language model.

The `Decoder` is Llama/Gemma/Magneto from one config: it embeds tokens (or takes embeddings a
multimodal model spliced media into), builds the mask once from `masks.py`, and runs the blocks
with an optional static KV cache. The model protocol the generation engine relies on is
`make_cache(batch, max_len)` plus `forward(input_ids, ..., cache=cache)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import DecoderConfig
from polymodal.errors import InputError, check_ids
from polymodal.nn.attention import Attention
from polymodal.nn.cache import Cache, KVCache
from polymodal.nn.loss import CHUNK_ELEMENTS, chunked_cross_entropy
from polymodal.nn.masks import Segments, attention_mask, block_mask, make_segments
from polymodal.nn.mlp import make_mlp
from polymodal.nn.norms import LayerNorm, make_norm
from polymodal.nn.packed import PackedMask
from polymodal.nn.positions import ALiBi, Rotary, RotaryTables
from polymodal.nn.language_model import LanguageModel
from polymodal.nn.lora import TrainableRows


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, S, V)
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # (B, S, dim) after the final norm


class Block(nn.Module):
    def __init__(self, attn: Attention, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module | None, *,
                 post_norm: bool = False, res_post_norm: bool = False, dropout: float = 0.0):
        """mlp_norm None: a parallel block (GPT-J, PaLM, Cohere), attention and MLP side by side on one norm."""
        super().__init__()
        self.attn, self.mlp = attn, mlp
        self.attn_norm, self.mlp_norm = attn_norm, mlp_norm
        self.post_norm, self.res_post_norm = post_norm, res_post_norm
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: RotaryTables | None = None, cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        if self.post_norm:  # original Transformer / BERT: normalise after each residual add
            x = self.attn_norm(x + self.dropout(self.attn(x, mask=mask, is_causal=is_causal, rope=rope,
                                                          cache=cache, input_pos=input_pos)))
            return self.mlp_norm(x + self.dropout(self.mlp(x)))
        if self.res_post_norm:  # Swin v2 / Chameleon swin_norm: normalise each branch before its add
            x = x + self.dropout(self.attn_norm(self.attn(x, mask=mask, is_causal=is_causal, rope=rope,
                                                          cache=cache, input_pos=input_pos)))
            return x + self.dropout(self.mlp_norm(self.mlp(x)))
        h = self.attn_norm(x)
        y = x + self.dropout(self.attn(h, mask=mask, is_causal=is_causal, rope=rope, cache=cache, input_pos=input_pos))
        if self.mlp_norm is None:
            return y + self.dropout(self.mlp(h))
        return y + self.dropout(self.mlp(self.mlp_norm(y)))


def decoder_block(cfg: DecoderConfig, backend: str = "sdpa") -> Block:
    sub_ln = cfg.norm_placement == "sub"
    qk_eps = cfg.qk_norm_eps or cfg.norm_eps

    def qk_norm(heads: int) -> nn.Module | None:
        if cfg.qk_norm_per_head:
            return LayerNorm(cfg.head_size, qk_eps, heads=heads)
        return make_norm(cfg.qk_norm, cfg.head_size, qk_eps) if cfg.qk_norm else None

    attn = Attention(
        cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_size, bias=cfg.attn_bias, qk_norm=qk_norm(cfg.n_heads),
        k_norm=qk_norm(cfg.kv_heads),
        inner_norm=LayerNorm(cfg.n_heads * cfg.head_size, cfg.norm_eps) if sub_ln else None,
        dropout=cfg.dropout, backend=backend,
    )
    mlp = make_mlp(cfg.mlp, cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias,  # the Block drops its output, once
                   inner_norm=LayerNorm(cfg.hidden_dim, cfg.norm_eps) if sub_ln else None)
    return Block(attn, mlp, make_norm(cfg.norm, cfg.dim, cfg.norm_eps),
                 None if cfg.parallel_blocks else make_norm(cfg.norm, cfg.dim, cfg.norm_eps),
                 post_norm=cfg.norm_placement == "post", res_post_norm=cfg.norm_placement == "swin",
                 dropout=cfg.dropout)


class Decoder(LanguageModel, nn.Module):
    def __init__(self, config: DecoderConfig, *, backend: str = "sdpa"):
        super().__init__()
        cfg = self.config = config
        if backend == "flex" and cfg.positions == "alibi":
            raise InputError("the flex backend does not take ALiBi's additive bias; use sdpa or eager")
        self.backend = backend
        self.sequence_split = None  # a `context_parallel.SequenceSplit`, set by `context_parallel.context_parallel`
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.positions == "learned" else None
        self.embed_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps) if cfg.embed_norm else None
        self.rotary = (Rotary(cfg.rotary_dim, cfg.rope_theta, interleaved=cfg.rope_interleaved,
                              scaling=cfg.rope_scaling,
                              xpos_scale_base=cfg.xpos_scale_base if cfg.positions == "xpos" else None)
                       if cfg.positions in ("rope", "xpos") else None)
        self.alibi = ALiBi(cfg.n_heads) if cfg.positions == "alibi" else None
        self.layers = nn.ModuleList(decoder_block(cfg, backend) for _ in range(cfg.n_layers))
        self.norm = None if cfg.norm_placement == "post" else make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.init == "magneto":
            self._magneto_gains()

    def _init_weights(self, module: nn.Module) -> None:
        if self.config.init == "magneto":  # torchscale: Linear layers keep PyTorch's default init
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=self.config.dim ** -0.5)
            return
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @torch.no_grad()
    def _magneto_gains(self) -> None:
        """Magneto (Wang et al. 2022), as torchscale's `Decoder(subln=True)`: the value, attention-output
        and FFN projections (weights and biases) of every block are scaled by sqrt(log(2N)), so sub-LN
        training stays stable with depth; the output head is N(0, 1/dim) like the embeddings."""
        gain = math.sqrt(math.log(2 * self.config.n_layers))
        qk_rows = (self.config.n_heads + self.config.kv_heads) * self.config.head_size  # wqkv rows before v
        for layer in self.layers:
            for p in (*layer.attn.wo.parameters(), *layer.mlp.w_in.parameters(), *layer.mlp.w_out.parameters()):
                p.mul_(gain)
            for p in layer.attn.wqkv.parameters():
                p[qk_rows:].mul_(gain)
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=self.config.dim ** -0.5)

    @property
    def text_config(self) -> DecoderConfig:
        return self.config

    @property
    def packs(self) -> bool:
        """Whether a packed call (`nn.packed`) runs it: attention per row needs no row-wise bias (ALiBi) or
        block mask (flex)."""
        return self.alibi is None and self.backend != "flex" and self.sequence_split is None

    @property
    def output_weight(self) -> torch.Tensor:
        head = self.tok_embeddings if self.output is None else self.output
        return head.merged_weight() if isinstance(head, TrainableRows) else head.weight

    def make_cache(self, batch: int, max_len: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> Cache:
        if max_len > self.config.max_seq_len:
            raise InputError(f"a cache of {max_len} tokens exceeds max_seq_len={self.config.max_seq_len}")
        w = self.tok_embeddings.weight
        return Cache(batch, max_len, self.config.n_layers, self.config.kv_heads, self.config.head_size,
                     dtype or w.dtype, device or w.device)

    def check_token_ids(self, input_ids: torch.Tensor) -> None:
        bad = (input_ids < 0) | (input_ids >= self.config.vocab_size)
        if bad.any():
            raise InputError(f"token ids must be in [0, {self.config.vocab_size}); got {input_ids[bad].tolist()[:8]} "
                             f"at positions {bad.nonzero().tolist()[:8]}")

    def check_prompt(self, input_ids: torch.Tensor) -> None:
        """What `forward` checks of a text prompt before any compute (`LanguageModel.packs`)."""
        check_ids(input_ids)
        self.check_token_ids(input_ids)
        if input_ids.shape[1] > self.config.max_seq_len:
            raise InputError(f"sequence of {input_ids.shape[1]} tokens exceeds max_seq_len={self.config.max_seq_len}")

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, block_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: Cache | None = None,
                logits_to_keep: int | torch.Tensor = 0) -> ModelOutput:
        """input_ids (B, S) or inputs_embeds (B, S, dim) (unscaled; media already spliced in).
        attention_mask / document_ids / block_ids / position_ids: see `masks.make_segments`.
        labels (B, S): next-token targets aligned with input_ids (shifted here), -100 = ignore.
        cache: a `make_cache` cache; when it already holds tokens, the input continues every row.
        logits_to_keep: >0 computes logits for the last n positions only; a 1-D tensor, at those positions.
        A packed call (`cache` a `paged_cache.PackedStep`): input_ids (1, T), every row's new tokens one after the
        other, T past max_seq_len if the rows' are not."""
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids and inputs_embeds")
        decoding = cache is not None and cache.length > 0
        if input_ids is not None:
            check_ids(input_ids)
            if not decoding:
                self.check_token_ids(input_ids)
            inputs_embeds = self.tok_embeddings(input_ids)
        B, S, _ = inputs_embeds.shape
        if S > self.config.max_seq_len and not (decoding and isinstance(cache.slots, PackedMask)):
            raise InputError(f"sequence of {S} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if decoding:
            if any(t is not None for t in (attention_mask, document_ids, block_ids, position_ids)):
                raise InputError("a cache that holds tokens continues each row causally; attention_mask, "
                                 "document_ids, block_ids and position_ids apply to the first call only")
            seg = cache.next_segments(S)
        else:
            seg = make_segments(B, S, inputs_embeds.device, attention_mask=attention_mask,
                                document_ids=document_ids, block_ids=block_ids, position_ids=position_ids)
        h = self.hidden_states(inputs_embeds, seg, cache=cache,
                               plain_causal=not decoding and all(t is None for t in (attention_mask, document_ids, block_ids)))
        return self.head(h, labels, logits_to_keep)

    def hidden_states(self, inputs_embeds: torch.Tensor, seg: Segments, *, cache: Cache | None = None,
                      plain_causal: bool = False,
                      before_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Runs the blocks over embeddings whose segments are known; returns normalised states.
        before_layer(i, x) -> x runs before block i: how a model interleaves its own blocks with the
        decoder's (Flamingo's gated cross-attention) while the decoder's weights and keys stay as they are."""
        x = inputs_embeds
        if self.config.embed_scale:  # Gemma: the normaliser is rounded to the activation dtype
            x = x * torch.tensor(math.sqrt(self.config.dim), dtype=x.dtype)
        if self.pos_embeddings is not None:
            # a host read, which would break a compiled decode step's graph
            if not torch.compiler.is_compiling() and int(seg.positions.max()) >= self.config.max_seq_len:
                raise InputError(f"position {int(seg.positions.max())} is past max_seq_len={self.config.max_seq_len}")
            x = x + self.pos_embeddings(seg.positions)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        split = self.sequence_split
        if split is not None and split.ring and cache is not None:
            split = None  # generation: every process runs the whole sequence with its cache, as one process
        if split is not None and (cache is not None or before_layer is not None):
            raise InputError("context parallel runs whole sequences through the decoder's own blocks: "
                             "no KV cache and no interleaved blocks (before_layer)")
        input_pos, k_seg, seq_len = None, seg, x.shape[1]
        if cache is not None:
            input_pos, k_seg = cache.write(seg), cache.slots
        is_causal = plain_causal and cache is None and self.alibi is None and self.backend != "flex" and split is None
        if split is not None:
            x, seg, mask = split.shard(x, seg, self.alibi)
        elif isinstance(k_seg, PackedMask):
            if not self.packs:
                raise InputError("a packed call attends per row through sdpa or eager, with rotary, learned or no "
                                 "positions; this decoder has ALiBi or the flex backend")
            mask = k_seg
        elif self.backend == "flex":
            mask = block_mask(seg, k_seg)
        else:
            mask = None if is_causal else attention_mask(seg, k_seg)
        if self.alibi is not None and split is None:
            mask = self.alibi(mask, seg.positions, k_seg.positions, x.dtype)
        rope = self.rotary(seg.positions, x.dtype) if self.rotary is not None else None
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                x = before_layer(i, x)
            x = layer(x, mask=mask, is_causal=is_causal, rope=rope,
                      cache=cache.layers[i] if cache is not None else None, input_pos=input_pos)
        x = self.norm(x) if self.norm is not None else x
        return x if split is None else split.gather(x, seq_len)

    def head(self, h: torch.Tensor, labels: torch.Tensor | None = None,
             logits_to_keep: int | torch.Tensor = 0) -> ModelOutput:
        """Logits (of the last logits_to_keep positions when > 0, or at the positions a 1-D tensor gives; HF's
        convention) and, given labels, the next-token loss,
        computed in chunks (`nn.loss`) without the (B, S, V) logits. A training-mode call with labels
        returns no logits (Liger-Kernel's skip_logits), so training never materialises them."""
        loss = logits = None
        hidden, h = h, h * self.config.logit_scale if self.config.logit_scale != 1.0 else h  # = scaled logits
        if labels is not None:
            if labels.shape != h.shape[:2]:
                raise InputError(f"labels must have shape {tuple(h.shape[:2])}, got {tuple(labels.shape)}")
            V = self.output_weight.shape[0]
            bad = (labels != -100) & ((labels < 0) | (labels >= V))
            if labels.is_floating_point() or bool(bad.any()):  # cross-entropy would index past the logits
                given = labels.dtype if labels.is_floating_point() else labels[bad].unique()[:5].tolist()
                raise InputError(f"labels must be integer token ids in [0, {V}) or -100 (ignored), got {given}")
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # the last position predicts nothing
            chunk = None
            if self.sequence_split is not None:  # every process computes the whole sequence's loss: keep no
                # logits for backward (one chunk would), hold at most 1/W of them at a time
                rows = -(-h.shape[0] * h.shape[1] // self.sequence_split.mesh.size())
                chunk = min(max(1, CHUNK_ELEMENTS // self.output_weight.shape[0]), rows)
            loss = chunked_cross_entropy(h, self.output_weight, targets, chunk)
        if labels is None or not self.training:
            if torch.is_tensor(logits_to_keep):
                h = h.index_select(1, logits_to_keep)
            elif logits_to_keep:
                h = h[:, -logits_to_keep:]
            logits = F.linear(h, self.output_weight)
        return ModelOutput(logits=logits, loss=loss, hidden_states=hidden)
