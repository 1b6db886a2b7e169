"""HF `CLIPModel` and `SiglipModel` checkpoint directories <-> polymodal `DualEncoder`.

The vision towers use `hf_vision`'s key map under `vision_model.`; the text towers are named as the
vision towers' encoders are. HF CLIP treats `eos_token_id == 2` as the legacy rule "pool the highest
token id", which polymodal writes as `eos_token_id=None`.
"""

from __future__ import annotations

import math

from polymodal.config import ConfigError
from polymodal.convert.rules import Family, Rule, linear_rules, norm_rules
from polymodal.convert.hf_vision import (VISION_ACT, encoder_layer_rules, vision_config_from_hf, vision_config_to_hf,
                                         vision_rules)
from polymodal.encoders.text import TextConfig
from polymodal.families.contrastive.config import ContrastiveConfig
from polymodal.families.contrastive.model import DualEncoder

LEGACY_EOS = 2  # HF CLIPTextTransformer: eos_token_id 2 means "pool at argmax(input_ids)"


def text_config_from_hf(hf: dict, variant: str) -> TextConfig:
    """Missing keys take HF's CLIPTextConfig / SiglipTextConfig defaults, as HF configs rely on them."""
    clip = variant == "clip"
    act = hf.get("hidden_act", "quick_gelu" if clip else "gelu_pytorch_tanh")
    if act not in VISION_ACT:
        raise ConfigError(f"text hidden_act {act!r} is not supported; supported: {sorted(VISION_ACT)}")
    eos = hf.get("eos_token_id", 49407)
    dim = hf.get("hidden_size", 512 if clip else 768)
    head = hf.get("projection_size")
    return TextConfig(
        variant=variant, vocab_size=hf.get("vocab_size", 49408 if clip else 32000), dim=dim,
        n_layers=hf.get("num_hidden_layers", 12), n_heads=hf.get("num_attention_heads", 8 if clip else 12),
        hidden_dim=hf.get("intermediate_size", 2048 if clip else 3072),
        max_seq_len=hf.get("max_position_embeddings", 77 if clip else 64), mlp=VISION_ACT[act],
        norm_eps=hf.get("layer_norm_eps", 1e-5 if clip else 1e-6),
        projection_size=None if clip or head in (None, dim) else head,
        pad_token_id=hf.get("pad_token_id", 1), bos_token_id=hf.get("bos_token_id", 49406),
        eos_token_id=None if clip and eos == LEGACY_EOS else eos,
    )


def text_config_to_hf(cfg: TextConfig) -> dict:
    clip = cfg.variant == "clip"
    if clip and cfg.eos_token_id == LEGACY_EOS:
        raise ConfigError(f"HF CLIP reads eos_token_id {LEGACY_EOS} as 'pool the highest token id', so a model that "
                          f"pools at token {LEGACY_EOS} has no HF CLIP equivalent; renumber the end-of-text token")
    act = {v: k for k, v in VISION_ACT.items()}[cfg.mlp]
    hf = {"model_type": f"{cfg.variant}_text_model", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
          "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.hidden_dim,
          "max_position_embeddings": cfg.max_seq_len, "hidden_act": act, "layer_norm_eps": cfg.norm_eps,
          "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id,
          "eos_token_id": LEGACY_EOS if clip and cfg.eos_token_id is None else cfg.eos_token_id}
    if not clip:
        hf["projection_size"] = cfg.out_dim
    return hf


def text_rules(cfg: TextConfig, ours: str, theirs: str) -> list[Rule]:
    rules = [Rule(f"{ours}tok_embeddings.weight", (f"{theirs}embeddings.token_embedding.weight",)),
             Rule(f"{ours}pos_embed.weight", (f"{theirs}embeddings.position_embedding.weight",))]
    rules += norm_rules(f"{ours}norm", f"{theirs}final_layer_norm")
    if cfg.variant == "siglip":
        rules += linear_rules(f"{ours}head", [f"{theirs}head"], None, True)
    return rules + encoder_layer_rules(cfg.dim, cfg.n_layers, ours, theirs)


def contrastive_rules(cfg: ContrastiveConfig) -> list[Rule]:
    rules = (vision_rules(cfg.vision, "vision.", "vision_model.") + text_rules(cfg.text, "text.", "text_model.")
             + [Rule("logit_scale", ("logit_scale",))])
    if cfg.projection_dim is not None:
        rules += [Rule("visual_projection.weight", ("visual_projection.weight",)),
                  Rule("text_projection.weight", ("text_projection.weight",))]
    if cfg.loss == "sigmoid":
        rules.append(Rule("logit_bias", ("logit_bias",)))
    return rules


def clip_config_from_hf(hf: dict) -> ContrastiveConfig:
    return ContrastiveConfig(vision=vision_config_from_hf(hf.get("vision_config", {}), "clip"),
                             text=text_config_from_hf(hf.get("text_config", {}), "clip"),
                             projection_dim=hf.get("projection_dim", 512), loss="softmax",
                             logit_scale_init=hf.get("logit_scale_init_value", 2.6592))


def siglip_config_from_hf(hf: dict) -> ContrastiveConfig:
    return ContrastiveConfig(vision=vision_config_from_hf(hf.get("vision_config", {}), "siglip"),
                             text=text_config_from_hf(hf.get("text_config", {}), "siglip"),
                             loss="sigmoid", logit_scale_init=math.log(10.0), logit_bias_init=-10.0)


def _check_exportable(cfg: ContrastiveConfig, variant: str) -> None:
    want = ("clip", "softmax", True) if variant == "clip" else ("siglip", "sigmoid", False)
    got = (cfg.vision.variant, cfg.loss, cfg.projection_dim is not None)
    if cfg.text.variant != cfg.vision.variant or got != want:
        raise ConfigError(f"HF {variant} needs {variant} towers, the {want[1]} loss and "
                          f"{'' if want[2] else 'no '}projections; this model has {cfg.vision.variant} vision, "
                          f"{cfg.text.variant} text, the {cfg.loss} loss and projection_dim={cfg.projection_dim}")


def clip_config_to_hf(cfg: ContrastiveConfig) -> dict:
    _check_exportable(cfg, "clip")
    p = cfg.projection_dim
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": p,
            "logit_scale_init_value": cfg.logit_scale_init,
            "text_config": {**text_config_to_hf(cfg.text), "projection_dim": p},
            "vision_config": {**vision_config_to_hf(cfg.vision), "projection_dim": p}}


def siglip_config_to_hf(cfg: ContrastiveConfig) -> dict:
    _check_exportable(cfg, "siglip")
    return {"architectures": ["SiglipModel"], "model_type": "siglip", "text_config": text_config_to_hf(cfg.text),
            "vision_config": vision_config_to_hf(cfg.vision)}


CLIP = Family(config_from_hf=clip_config_from_hf, build=DualEncoder, rules=contrastive_rules,
              config_to_hf=clip_config_to_hf, ignore=("position_ids",))
SIGLIP = Family(config_from_hf=siglip_config_from_hf, build=DualEncoder, rules=contrastive_rules,
                config_to_hf=siglip_config_to_hf, ignore=("position_ids",))
