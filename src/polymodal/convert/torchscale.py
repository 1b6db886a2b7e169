"""torchscale (Microsoft, the KOSMOS-1 / Magneto reference) decoder weights <-> polymodal `Decoder`.

torchscale's `Decoder(DecoderConfig(...))` is a fairseq-style LM: `embed_tokens`, per layer
`self_attn.{q,k,v,out}_proj` (biased), `self_attn.inner_attn_ln` (sub-LN), `self_attn_layer_norm`,
`ffn.fc1`, `ffn.ffn_layernorm` (sub-LN), `ffn.fc2`, `final_layer_norm`, then `layer_norm` and
`output_projection`. Its xPos `scale` buffers are recomputed here, not loaded. The options it has
and polymodal does not (DeepNet residual scaling, MoE, bucketed relative positions, multiway,
learned/sinusoidal positions passed in from outside) are refused with a clear error.
"""

from __future__ import annotations

from typing import Any

import torch

from polymodal.errors import CheckpointError
from polymodal.config import ConfigError, DecoderConfig
from polymodal.convert.rules import Rule, linear_rules, norm_rules
from polymodal.nn.transformer import Decoder
from polymodal.serialization import load_into

IGNORED = (".xpos.scale",)  # torchscale's xPos buffers: a function of head_dim only


def config_from_torchscale(args: Any) -> DecoderConfig:
    """Our config for a torchscale `architecture.config.DecoderConfig` (or any object with its fields)."""
    unsupported = {
        "deepnorm": args.deepnorm, "moe_freq": args.moe_freq, "rel_pos_buckets": args.rel_pos_buckets,
        "multiway": args.multiway, "no_output_layer": args.no_output_layer,
        "xpos_rel_pos=False": not args.xpos_rel_pos,
        "decoder_normalize_before=False": not args.decoder_normalize_before,
    }
    given = sorted(k for k, v in unsupported.items() if v)
    if given:
        raise ConfigError(f"torchscale decoder options without a polymodal equivalent: {given}; supported: "
                          "subln or pre-LN, xpos_rel_pos=True, no MoE, no relative position buckets, no multiway")
    if args.activation_fn != "gelu":
        raise ConfigError(f"torchscale activation_fn {args.activation_fn!r} is not supported; supported: 'gelu'")
    return DecoderConfig(
        vocab_size=args.vocab_size, dim=args.decoder_embed_dim, n_layers=args.decoder_layers,
        n_heads=args.decoder_attention_heads, hidden_dim=args.decoder_ffn_embed_dim, mlp="gelu",
        norm="layernorm", norm_eps=args.layernorm_eps, norm_placement="sub" if args.subln else "pre",
        positions="xpos", xpos_scale_base=float(args.xpos_scale_base), max_seq_len=args.max_target_positions,
        attn_bias=True, mlp_bias=True, tie_embeddings=args.share_decoder_input_output_embed,
        embed_scale=not args.no_scale_embedding, embed_norm=args.layernorm_embedding, dropout=args.dropout,
        init="magneto" if args.subln else "normal",
    )


def decoder_rules(cfg: DecoderConfig, ours: str = "", theirs: str = "") -> list[Rule]:
    """Key map from a torchscale decoder state dict (under `theirs`) to a polymodal `Decoder` (under `ours`)."""
    d = cfg.dim
    rules = [Rule(f"{ours}tok_embeddings.weight", (f"{theirs}embed_tokens.weight",)),
             *norm_rules(f"{ours}norm", f"{theirs}layer_norm")]
    if cfg.embed_norm:
        rules += norm_rules(f"{ours}embed_norm", f"{theirs}layernorm_embedding")
    for i in range(cfg.n_layers):
        o, t = f"{ours}layers.{i}.", f"{theirs}layers.{i}."
        rules += linear_rules(f"{o}attn.wqkv", [f"{t}self_attn.{p}_proj" for p in "qkv"], [d, d, d], True)
        rules += linear_rules(f"{o}attn.wo", [f"{t}self_attn.out_proj"], None, True)
        rules += linear_rules(f"{o}mlp.w_in", [f"{t}ffn.fc1"], None, True)
        rules += linear_rules(f"{o}mlp.w_out", [f"{t}ffn.fc2"], None, True)
        rules += norm_rules(f"{o}attn_norm", f"{t}self_attn_layer_norm")
        rules += norm_rules(f"{o}mlp_norm", f"{t}final_layer_norm")
        if cfg.norm_placement == "sub":
            rules += norm_rules(f"{o}attn.inner_norm", f"{t}self_attn.inner_attn_ln")
            rules += norm_rules(f"{o}mlp.inner_norm", f"{t}ffn.ffn_layernorm")
    if not cfg.tie_embeddings:
        rules.append(Rule(f"{ours}output.weight", (f"{theirs}output_projection.weight",)))
    return rules


def load_torchscale_decoder(state: dict[str, torch.Tensor], args: Any,
                            source: str = "torchscale state dict") -> Decoder:
    """A polymodal `Decoder` holding the weights of a torchscale decoder (its `state_dict()` and config)."""
    cfg = config_from_torchscale(args)
    rules = decoder_rules(cfg)
    used = {k for r in rules for k in r.theirs}
    if cfg.tie_embeddings and "output_projection.weight" in state:  # the shared embedding, listed twice
        if not torch.equal(state["output_projection.weight"], state["embed_tokens.weight"]):
            raise CheckpointError(f"{source}: share_decoder_input_output_embed is set, but output_projection.weight "
                             "differs from embed_tokens.weight")
        used.add("output_projection.weight")
    extra = sorted(k for k in state if k not in used and not k.endswith(IGNORED))
    if extra:
        raise CheckpointError(f"{source} has tensors the config does not explain: {extra[:10]}")
    model = Decoder(cfg)
    load_into(model, {r.ours: r.gather(state) for r in rules}, source)
    return model
