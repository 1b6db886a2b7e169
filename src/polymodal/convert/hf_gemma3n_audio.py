"""Gemma 3n's audio tower (HF `Gemma3nAudioEncoder`) <-> polymodal's `ConformerEncoder`.

Two HF layouts: a whole Gemma 3n directory (model_type "gemma3n"; the tower's tensors under
`model.audio_tower.`, its config under `audio_config`; the text and vision towers are skipped), and the
tower saved alone (model_type "gemma3n_audio"; no prefix).
"""

from __future__ import annotations

from polymodal.config import ConfigError
from polymodal.convert.rules import Family, Rule, linear_rules
from polymodal.encoders.conformer import ConformerConfig, ConformerEncoder

PREFIX = "model.audio_tower."


def _square(hf: dict, key: str) -> int:
    """One size for every sub-sampling conv and both axes: the layout polymodal builds."""
    sizes = {int(s) for pair in hf[key] for s in pair}
    if len(sizes) != 1:
        raise ConfigError(f"{key} must be one square size for every sub-sampling conv, got {hf[key]}")
    return sizes.pop()


def conformer_config_from_hf(hf: dict) -> ConformerConfig:
    """A `Gemma3nAudioConfig` as a dict (a whole Gemma 3n config: its `audio_config`)."""
    if hf.get("model_type") == "gemma3n":
        hf = hf["audio_config"]
    if hf.get("conf_attention_context_right", 0) != 0:
        raise ConfigError(f"conf_attention_context_right must be 0 (the encoder looks back only), "
                          f"got {hf['conf_attention_context_right']}")
    return ConformerConfig(
        n_mels=hf["input_feat_size"], dim=hf["hidden_size"], n_layers=hf["conf_num_hidden_layers"],
        n_heads=hf["conf_num_attention_heads"], chunk=hf["conf_attention_chunk_size"],
        left_context=hf["conf_attention_context_left"], logit_cap=float(hf["conf_attention_logit_cap"]),
        conv_kernel=hf["conf_conv_kernel_size"], reduction=hf["conf_reduction_factor"],
        residual_weight=float(hf["conf_residual_weight"]), sub_channels=tuple(hf["sscp_conv_channel_size"]),
        sub_kernel=_square(hf, "sscp_conv_kernel_size"), sub_stride=_square(hf, "sscp_conv_stride_size"),
        group_norm_eps=float(hf["sscp_conv_group_norm_eps"]), norm_eps=float(hf["rms_norm_eps"]),
        clip=float(hf["gradient_clipping"]),
    )


def conformer_config_to_hf(cfg: ConformerConfig) -> dict:
    """The config of the tower alone (model_type "gemma3n_audio")."""
    n = len(cfg.sub_channels)
    return {
        "architectures": ["Gemma3nAudioEncoder"], "model_type": "gemma3n_audio",
        "input_feat_size": cfg.n_mels, "hidden_size": cfg.dim, "conf_num_hidden_layers": cfg.n_layers,
        "conf_num_attention_heads": cfg.n_heads, "conf_attention_chunk_size": cfg.chunk,
        "conf_attention_context_left": cfg.left_context, "conf_attention_context_right": 0,
        "conf_attention_logit_cap": cfg.logit_cap, "conf_conv_kernel_size": cfg.conv_kernel,
        "conf_reduction_factor": cfg.reduction, "conf_residual_weight": cfg.residual_weight,
        "sscp_conv_channel_size": list(cfg.sub_channels), "sscp_conv_kernel_size": [[cfg.sub_kernel] * 2] * n,
        "sscp_conv_stride_size": [[cfg.sub_stride] * 2] * n, "sscp_conv_group_norm_eps": cfg.group_norm_eps,
        "rms_norm_eps": cfg.norm_eps, "gradient_clipping": cfg.clip,
    }


def _tower_only(cfg: ConformerConfig) -> dict:
    raise ConfigError("a ConformerEncoder alone is written as model_type 'gemma3n_audio' (the audio tower), "
                      "not as a whole Gemma 3n")


def conformer_rules(cfg: ConformerConfig, theirs: str = PREFIX) -> list[Rule]:
    sub = f"{theirs}subsample_conv_projection."
    pairs = [(f"subsample.{j}.{part}", f"{sub}conv_{j}.{part}") for j in range(len(cfg.sub_channels))
             for part in ("conv", "norm")]
    pairs.append(("input_proj", f"{sub}input_proj_linear"))
    rules = []
    for i in range(cfg.n_layers):
        o, t = f"layers.{i}.", f"{theirs}conformer.{i}."
        for ffw, hf_ffw in (("ffw_start", "ffw_layer_start"), ("ffw_end", "ffw_layer_end")):
            pairs += [(f"{o}{ffw}.pre_norm", f"{t}{hf_ffw}.pre_layer_norm"),
                      (f"{o}{ffw}.mlp.w_in", f"{t}{hf_ffw}.ffw_layer_1"),
                      (f"{o}{ffw}.mlp.w_out", f"{t}{hf_ffw}.ffw_layer_2"),
                      (f"{o}{ffw}.post_norm", f"{t}{hf_ffw}.post_layer_norm")]
        a = f"{t}attention."
        pairs += [(f"{o}attn_norm", f"{a}pre_attn_norm"),
                  (f"{o}attn.rel_pos.pos_proj", f"{a}attn.relative_position_embedding.pos_proj"),
                  (f"{o}attn.wo", f"{a}post"), (f"{o}attn_post_norm", f"{a}post_norm"),
                  (f"{o}lconv.pre_norm", f"{t}lconv1d.pre_layer_norm"),
                  (f"{o}lconv.linear_start", f"{t}lconv1d.linear_start"),
                  (f"{o}lconv.depthwise", f"{t}lconv1d.depthwise_conv1d"),
                  (f"{o}lconv.conv_norm", f"{t}lconv1d.conv_norm"), (f"{o}lconv.linear_end", f"{t}lconv1d.linear_end"),
                  (f"{o}norm", f"{t}norm")]
        rules += linear_rules(f"{o}attn.wqkv", [f"{a}attn.{p}_proj" for p in "qkv"], [cfg.dim] * 3, False)
        rules.append(Rule(f"{o}attn.per_dim_scale", (f"{a}attn.per_dim_scale",)))
    return [Rule(f"{ours}.weight", (f"{hf}.weight",)) for ours, hf in pairs] + rules


GEMMA3N_AUDIO = Family(  # a whole Gemma 3n directory, read for its audio tower
    config_from_hf=conformer_config_from_hf,
    build=ConformerEncoder,
    rules=conformer_rules,
    config_to_hf=_tower_only,
    skip=("model.language_model.", "model.vision_tower.", "model.embed_vision.", "model.embed_audio.", "lm_head."),
)

GEMMA3N_AUDIO_TOWER = Family(  # the tower saved alone
    config_from_hf=conformer_config_from_hf,
    build=ConformerEncoder,
    rules=lambda cfg: conformer_rules(cfg, theirs=""),
    config_to_hf=conformer_config_to_hf,
)
