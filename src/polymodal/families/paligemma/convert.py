"""HF `PaliGemmaForConditionalGeneration` checkpoints <-> polymodal `PaliGemma`: the SigLIP tower's key map
(`convert/hf_vision.py`), the projector, and Gemma's decoder map. Export writes the layout transformers 5
saves; 4.x's and the in-memory `model.` prefixes load through aliases.
"""

from __future__ import annotations

from polymodal.config import ConfigError
from polymodal.convert.hf_vision import vision_config_from_hf, vision_config_to_hf, vision_rules
from polymodal.convert.rules import (Family, Rule, decoder_config_from_hf, decoder_config_to_hf, decoder_rules,
                                    linear_rules, tied_head)
from polymodal.families.paligemma.config import PaliGemmaConfig
from polymodal.families.paligemma.model import PaliGemma

# HF's GemmaConfig defaults (PaliGemma's text_config in the released checkpoints leaves most of them out)
HF_GEMMA_DEFAULTS = {"vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
                     "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256,
                     "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
                     "bos_token_id": 2, "tie_word_embeddings": True}



def paligemma_config_from_hf(hf: dict) -> PaliGemmaConfig:
    text_type = hf.get("text_config", {}).get("model_type", "gemma")
    if text_type != "gemma":  # PaliGemma 2 (Gemma 2: logit soft-capping, sliding windows, sandwich norms)
        raise ConfigError(f"PaliGemma's text_config.model_type {text_type!r} is not supported; supported: ['gemma']")
    text = decoder_config_from_hf({**HF_GEMMA_DEFAULTS, **hf.get("text_config", {})}, gemma=True)
    vision = vision_config_from_hf(hf.get("vision_config", {}), "siglip")
    projection_dim = hf.get("projection_dim", 2048)
    if projection_dim != text.dim:
        raise ConfigError(f"PaliGemma's projector must map to the text width: projection_dim ({projection_dim}) != "
                          f"text_config.hidden_size ({text.dim})")
    image_token_id = hf.get("image_token_index", hf.get("image_token_id", 256000))
    return PaliGemmaConfig(vision=vision, text=text, image_token_id=image_token_id)


def paligemma_config_to_hf(cfg: PaliGemmaConfig) -> dict:
    """HF's PaliGemma config; a mask VQ-VAE (`cfg.mask_vae`) has no place there: `hf_export.export_hf` writes it
    beside the weights as big_vision's `vae-oid.npz`."""
    text = decoder_config_to_hf(cfg.text, gemma=True)
    vision = {**vision_config_to_hf(cfg.vision), "projection_dim": cfg.text.dim}
    return {"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
            "image_token_index": cfg.image_token_id, "projection_dim": cfg.text.dim, "hidden_size": cfg.text.dim,
            "text_config": text, "vision_config": vision, "tie_word_embeddings": cfg.text.tie_embeddings}


def paligemma_rules(cfg: PaliGemmaConfig) -> list[Rule]:
    return (vision_rules(cfg.vision, "vision.", "vision_tower.")
            + linear_rules("projector", ["multi_modal_projector.linear"], None, True)
            + decoder_rules(cfg.text, "decoder.", "language_model.model.", "language_model.lm_head"))


PALIGEMMA = Family(
    config_from_hf=paligemma_config_from_hf,
    build=PaliGemma,
    rules=paligemma_rules,
    config_to_hf=paligemma_config_to_hf,
    ignore=("rotary_emb.inv_freq",),
    tied_head=tied_head("language_model.lm_head.weight", "language_model.model.embed_tokens.weight",
                        lambda cfg: cfg.text),
    # on disk (5.x and 4.x) vs in memory (5.x, and 4.x's `vision_model.` inside the tower)
    aliases=(("vision_tower.vision_model.", "vision_tower."), ("model.vision_tower.vision_model.", "vision_tower."),
             ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
             ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
)
