"""The registries derived from `families.FAMILIES`: presets, config classes, HF model_types, collators."""

from __future__ import annotations

import dataclasses

import pytest

import polymodal as pm
from polymodal import families
from polymodal.config import ConfigError
from polymodal.convert.hf_export import model_type_of
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.vit import VisionConfig
from polymodal.errors import DocumentError
from polymodal.families import FAMILIES, load_config, merged, spec_of
from polymodal.families.collators import fit_to_tokenizer, make_collator

TOKENIZER = Tokenizer.train(["a red circle", "a blue square"], vocab_size=300)


def test_a_preset_name_two_families_claim_is_an_error(monkeypatch):
    spec = FAMILIES["decoder"]
    twin = dataclasses.replace(spec, presets={"llama-tiny": spec.presets["llama-tiny"]})
    monkeypatch.setattr(families, "FAMILIES", {**FAMILIES, "twin": twin})
    with pytest.raises(ConfigError, match="presets 'llama-tiny' is claimed by two families \\(decoder and twin\\)"):
        merged("presets")


@pytest.mark.parametrize("name", sorted(pm.PRESETS))
def test_every_preset_belongs_to_its_family_and_loads_back_from_json(name, tmp_path):
    config = pm.PRESETS[name]()
    owners = [family for family, spec in FAMILIES.items() if name in spec.presets]
    assert len(owners) == 1 and spec_of(config) is FAMILIES[owners[0]]
    config.to_json(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == config


def clip_tiny(**changes):
    """clip-tiny with an end-of-text id HF CLIP reads as such (its 2 means "pool the highest id" there)."""
    config = pm.PRESETS["clip-tiny"]()
    return config.replace(text=config.text.replace(eos_token_id=3), **changes)


@pytest.mark.parametrize("config, model_type", [("llama-tiny", "llama"), ("gemma-tiny", "gemma"),
                                                (clip_tiny(), "clip"), ("siglip-tiny", "siglip"),
                                                ("flamingo-tiny", "idefics")])
def test_a_model_is_exported_as_the_model_type_its_config_converts_to(config, model_type):
    assert model_type_of(pm.build(config)) == model_type


def test_a_model_whose_config_no_hf_layout_takes_has_no_model_type_and_is_told_why():
    with pytest.raises(ValueError, match="a ContrastiveConfig model has no Hugging Face model_type polymodal writes; "
                                         "clip: HF clip needs .* the softmax loss.*; siglip: HF siglip needs siglip"):
        model_type_of(pm.build(clip_tiny(loss="sigmoid")))  # CLIP towers with SigLIP's loss: neither


def test_each_family_gets_the_collator_its_spec_names():
    for name in ("llama-tiny", "flamingo-tiny", "clip-tiny"):
        config = fit_to_tokenizer(pm.PRESETS[name](), TOKENIZER)
        spec = spec_of(config)
        collator = make_collator(config, TOKENIZER)
        assert type(collator.format) is spec.format
        assert spec.collator is None or type(collator) is spec.collator


def test_an_encoder_alone_reads_no_documents():
    vit = VisionConfig(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    with pytest.raises(DocumentError, match="a VisionConfig model reads no documents"):
        make_collator(vit, TOKENIZER)
