"""Key maps for HF `SiglipVisionModel` and `CLIPVisionModel`.

Export writes the layout transformers 5 saves; the other layouts (4.x's `vision_model.` prefix) load
through aliases. `vision_rules(cfg, ours, theirs)` and the config converters are shared with every family
that holds a CLIP or SigLIP tower (PaliGemma, dual encoders, Idefics).
"""

from __future__ import annotations

from polymodal.config import ConfigError
from polymodal.convert.rules import Family, Rule, linear_rules, norm_rules
from polymodal.encoders.vit import ViT, VisionConfig

VISION_ACT = {"gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "gelu": "gelu"}
# HF's SiglipVisionConfig / CLIPVisionConfig defaults: a key a config.json leaves out means these
HF_VISION_DEFAULTS = {
    "siglip": {"image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_size": 768, "num_hidden_layers": 12,
               "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu_pytorch_tanh",
               "layer_norm_eps": 1e-6, "vision_use_head": True},
    "clip": {"image_size": 224, "patch_size": 32, "num_channels": 3, "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
}
def vision_config_from_hf(hf: dict, variant: str) -> VisionConfig:
    """A `VisionConfig` from an HF vision config dict (a `vision_config` inside CLIP/SigLIP/PaliGemma too)."""
    hf = {**HF_VISION_DEFAULTS[variant], **hf}
    act = hf["hidden_act"]
    if act not in VISION_ACT:
        raise ConfigError(f"vision hidden_act {act!r} is not supported; supported: {sorted(VISION_ACT)}")
    return VisionConfig(
        variant=variant, image_size=hf["image_size"], patch_size=hf["patch_size"], channels=hf["num_channels"],
        dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        hidden_dim=hf["intermediate_size"], mlp=VISION_ACT[act], norm_eps=hf["layer_norm_eps"],
        pooling_head=variant == "siglip" and hf["vision_use_head"],
    )


def vision_config_to_hf(cfg: VisionConfig) -> dict:
    act = {v: k for k, v in VISION_ACT.items()}[cfg.mlp]
    hf = {"model_type": f"{cfg.variant}_vision_model", "image_size": cfg.image_size, "patch_size": cfg.patch_size,
          "num_channels": cfg.channels, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
          "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.hidden_dim, "hidden_act": act,
          "layer_norm_eps": cfg.norm_eps}
    if cfg.variant == "siglip":
        hf["vision_use_head"] = cfg.pooling_head
    return hf


def encoder_layer_rules(dim: int, n_layers: int, ours: str, theirs: str) -> list[Rule]:
    """The encoder layers of a CLIP/SigLIP tower, image or text (`encoders.vit.encoder_blocks`)."""
    rules = []
    for i in range(n_layers):
        o, t = f"{ours}layers.{i}.", f"{theirs}encoder.layers.{i}."
        rules += linear_rules(f"{o}attn.wqkv", [f"{t}self_attn.{p}_proj" for p in "qkv"], [dim] * 3, True)
        rules += linear_rules(f"{o}attn.wo", [f"{t}self_attn.out_proj"], None, True)
        rules += norm_rules(f"{o}attn_norm", f"{t}layer_norm1") + norm_rules(f"{o}mlp_norm", f"{t}layer_norm2")
        rules += linear_rules(f"{o}mlp.w_in", [f"{t}mlp.fc1"], None, True)
        rules += linear_rules(f"{o}mlp.w_out", [f"{t}mlp.fc2"], None, True)
    return rules


def vision_rules(cfg: VisionConfig, ours: str = "", theirs: str = "") -> list[Rule]:
    d = cfg.dim
    rules = [Rule(f"{ours}patch_embed.weight", (f"{theirs}embeddings.patch_embedding.weight",)),
             Rule(f"{ours}pos_embed.weight", (f"{theirs}embeddings.position_embedding.weight",))]
    rules += norm_rules(f"{ours}post_norm", f"{theirs}post_layernorm")
    if cfg.variant == "clip":
        rules.append(Rule(f"{ours}class_token", (f"{theirs}embeddings.class_embedding",)))
        rules += norm_rules(f"{ours}pre_norm", f"{theirs}pre_layrnorm")
    else:
        rules.append(Rule(f"{ours}patch_embed.bias", (f"{theirs}embeddings.patch_embedding.bias",)))
    rules += encoder_layer_rules(d, cfg.n_layers, ours, theirs)
    if cfg.variant == "siglip" and cfg.pooling_head:
        h, th = f"{ours}head.", f"{theirs}head."
        rules.append(Rule(f"{h}probe", (f"{th}probe",)))
        for suffix in ("weight", "bias"):  # nn.MultiheadAttention keeps q, k, v in one in_proj tensor
            rules.append(Rule(f"{h}attn.wq.{suffix}", (f"{th}attention.in_proj_{suffix}",), rows=(0, d)))
            rules.append(Rule(f"{h}attn.wkv.{suffix}", (f"{th}attention.in_proj_{suffix}",), rows=(d, 3 * d)))
        rules += linear_rules(f"{h}attn.wo", [f"{th}attention.out_proj"], None, True)
        rules += norm_rules(f"{h}norm", f"{th}layernorm")
        rules += linear_rules(f"{h}mlp.w_in", [f"{th}mlp.fc1"], None, True)
        rules += linear_rules(f"{h}mlp.w_out", [f"{th}mlp.fc2"], None, True)
    return rules


VISION_ALIASES = (("vision_model.", ""),)

SIGLIP_VISION, CLIP_VISION = (Family(
    config_from_hf=lambda hf, v=variant: vision_config_from_hf(hf, v),
    build=ViT,
    rules=vision_rules,
    config_to_hf=lambda cfg, v=variant: {"architectures": [f"{v.upper() if v == 'clip' else 'Siglip'}VisionModel"],
                                         **vision_config_to_hf(cfg)},
    aliases=VISION_ALIASES,
) for variant in ("siglip", "clip"))
