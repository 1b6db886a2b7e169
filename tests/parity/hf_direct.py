"""Reads an HF directory through one `convert.rules.Family` given by hand, before the family is registered in
`convert.hf.FAMILIES` (where `pm.from_pretrained` finds it): the same config conversion, key map and loader."""

from pathlib import Path

from polymodal.config import read_json_config
from polymodal.convert.load import load_model
from polymodal.convert.rules import Family
from polymodal.weights import Weights


def load_with_family(family: Family, directory: Path):
    """(model, the checkpoint's tensors that no rule read, skipped prefixes aside)."""
    cfg = family.config_from_hf(read_json_config(directory / "config.json"))
    weights = Weights(directory)
    names = {family.canonical(k): k for k in weights.keys()}
    names = {k: v for k, v in names.items() if not k.startswith(family.skip)}
    rules = family.rules(cfg)
    used = {k for rule in rules for k in rule.theirs}
    model = load_model(family.build, cfg, weights, rules, names, dtype=None, device=None, quantize=None)
    return model, set(names) - used
