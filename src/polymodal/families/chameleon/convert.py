"""HF `ChameleonForConditionalGeneration` checkpoints <-> polymodal `Chameleon`.

The decoder is the Llama key map plus per-head q/k LayerNorms (weight and bias (heads, hs)). The VQ
tokenizer keeps HF's names under `model.vqmodel.`. HF's config names image codes through its
`vocabulary_map`: `IMGIMG<digits as A-J>Z` is code <digits>; `<image>` is the input placeholder and
`<racm3:break>` / `<eoss>` open and close an image. HF defines no VQ decoder: a checkpoint without
one loads encode-only; a polymodal model with a decoder exports it under `model.vqmodel.decoder.`
(HF skips those tensors) and marks `vq_config.decoder`, so the round trip keeps it.
"""

from __future__ import annotations

import torch

from polymodal.config import ConfigError
from polymodal.convert.rules import (Family, Rule, decoder_config_from_hf, decoder_config_to_hf, decoder_rules,
                                    tied_head)
from polymodal.encoders.vq import VQConfig, VQModel
from polymodal.families.chameleon.config import ChameleonConfig
from polymodal.families.chameleon.model import Chameleon

BEGIN_IMAGE, END_IMAGE, IMAGE = "<racm3:break>", "<eoss>", "<image>"
QK_NORM_EPS = 1e-5  # HF ChameleonLayerNorm's fixed eps
VQ_DEFAULTS = dict(embed_dim=256, num_embeddings=8192, double_latent=False, latent_channels=256, resolution=512,
                   in_channels=3, base_channels=128, channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2,
                   attn_resolutions=None, dropout=0.0, attn_type="vanilla")  # HF ChameleonVQVAEConfig


def code_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def code_of_name(name: str) -> int:
    return int("".join(str(ord(c) - ord("A")) if "A" <= c <= "J" else c for c in name[len("IMGIMG"):-1]))


def vq_config_from_hf(vq: dict, decoder: bool) -> VQConfig:
    vq = {**VQ_DEFAULTS, **vq}
    if vq["double_latent"]:
        raise ConfigError("vq_config.double_latent=True is not supported (HF's quant_conv could not take it either)")
    vanilla = vq["attn_type"] == "vanilla"
    return VQConfig(resolution=vq["resolution"], in_channels=vq["in_channels"], base_channels=vq["base_channels"],
                    channel_multiplier=list(vq["channel_multiplier"]), num_res_blocks=vq["num_res_blocks"],
                    attn_resolutions=list(vq["attn_resolutions"] or []) if vanilla else [], mid_attn=vanilla,
                    latent_channels=vq["latent_channels"], embed_dim=vq["embed_dim"],
                    num_embeddings=vq["num_embeddings"], beta=vq.get("beta", 0.25), dropout=vq["dropout"],
                    decoder=decoder)


def config_from_hf(hf: dict) -> ChameleonConfig:
    text = decoder_config_from_hf(hf, gemma=False)
    text = text.replace(qk_norm="layernorm", qk_norm_per_head=True,
                        qk_norm_eps=None if text.norm_eps == QK_NORM_EPS else QK_NORM_EPS,
                        norm_placement="swin" if hf.get("swin_norm") else "pre")
    vq_hf = hf.get("vq_config") or {}
    vq = vq_config_from_hf(vq_hf, decoder=bool(vq_hf.get("decoder", False)))
    vocab = hf.get("vocabulary_map") or {}
    codes = {code_of_name(name): token for name, token in vocab.items() if name.startswith("IMGIMG")}
    if sorted(codes) != list(range(vq.num_embeddings)):
        raise ConfigError(f"vocabulary_map must name one IMGIMG token for each of the {vq.num_embeddings} VQ codes; "
                          f"it names {len(codes)}")
    tokens = [codes[c] for c in range(vq.num_embeddings)]
    contiguous = tokens == list(range(tokens[0], tokens[0] + len(tokens)))
    return ChameleonConfig(text=text, vq=vq, image_tokens=tokens[0] if contiguous else tokens,
                           image_token_id=vocab.get(IMAGE), begin_image_id=vocab.get(BEGIN_IMAGE),
                           end_image_id=vocab.get(END_IMAGE))


def config_to_hf(cfg: ChameleonConfig) -> dict:
    text, vq = cfg.text, cfg.vq
    qk_eps = text.qk_norm_eps or text.norm_eps
    if not (text.qk_norm == "layernorm" and text.qk_norm_per_head and qk_eps == QK_NORM_EPS):
        raise ConfigError(f"HF Chameleon needs a per-head LayerNorm qk-norm with eps {QK_NORM_EPS}")
    if text.norm_placement not in ("pre", "swin") or text.head_size * text.n_heads != text.dim:
        raise ConfigError("HF Chameleon needs norm_placement 'pre' or 'swin' and head_dim = dim / n_heads")
    if vq.norm_groups != 32 or (vq.attn_resolutions and not vq.mid_attn):
        raise ConfigError("HF Chameleon's VQ needs norm_groups=32 and, with attn_resolutions, mid_attn=True")
    hf = decoder_config_to_hf(text, gemma=False)
    del hf["head_dim"]
    vocab = {code_name(c): t for c, t in enumerate(cfg.code_tokens)}
    for name, token in ((IMAGE, cfg.image_token_id), (BEGIN_IMAGE, cfg.begin_image_id), (END_IMAGE, cfg.end_image_id)):
        if token is not None:
            vocab[name] = token
    hf.update(architectures=["ChameleonForConditionalGeneration"], model_type="chameleon",
              swin_norm=text.norm_placement == "swin", vocabulary_map=vocab, vq_config=dict(
                  embed_dim=vq.embed_dim, num_embeddings=vq.num_embeddings, double_latent=False,
                  latent_channels=vq.latent_channels, resolution=vq.resolution, in_channels=vq.in_channels,
                  base_channels=vq.base_channels, channel_multiplier=list(vq.channel_multiplier),
                  num_res_blocks=vq.num_res_blocks, attn_resolutions=list(vq.attn_resolutions), dropout=vq.dropout,
                  attn_type="vanilla" if vq.mid_attn else "none", beta=vq.beta, decoder=vq.decoder))
    return hf


def rules(cfg: ChameleonConfig) -> list[Rule]:
    out = decoder_rules(cfg.text, ours="decoder.", theirs="model.", lm_head="lm_head")
    for i in range(cfg.text.n_layers):
        out += [Rule(f"decoder.layers.{i}.attn.{n}_norm.{p}", (f"model.layers.{i}.self_attn.{n}_norm.{p}",))
                for n in "qk" for p in ("weight", "bias")]
    with torch.device("meta"):  # the VQ keeps HF's names: list them without allocating weights
        names = list(VQModel(cfg.vq).state_dict())
    return out + [Rule(f"vq.{k}", (f"model.vqmodel.{k}",)) for k in names]


CHAMELEON = Family(config_from_hf=config_from_hf, build=Chameleon, rules=rules, config_to_hf=config_to_hf,
                   ignore=("rotary_emb.inv_freq",),
                   tied_head=tied_head("lm_head.weight", "model.embed_tokens.weight", lambda cfg: cfg.text))
