"""`polymodal convert --to hf` on a model of every `*-tiny` preset `polymodal train --model` builds, as the README's
"Export a run to Hugging Face transformers" says: the presets with an HF equivalent are written as that model_type
(tests/e2e/test_hf_export.py checks what transformers then answers), the others are refused in one line naming
why, and nothing is written for them."""

import json

import pytest
import torch

import polymodal as pm
from polymodal.cli import main
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.collators import fit_to_tokenizer
from polymodal.presets import get_preset

EXPORTS = {"paligemma-world": "paligemma", "paligemma-tiny": "paligemma", "llama-tiny": "llama",
           "gemma-tiny": "gemma", "siglip-tiny": "siglip"}
REFUSED = {"gemini-tiny": "no Fuyu equivalent", "chameleon-tiny": "HF Chameleon's VQ needs",
           "flamingo-tiny": "no Idefics equivalent", "kosmos-tiny": "KosmosConfig model has no Hugging Face model_type",
           "clip-tiny": "no HF CLIP equivalent"}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(World(seed=0).texts(), vocab_size=320)


def saved(preset: str, tokenizer: Tokenizer, directory):
    torch.manual_seed(0)
    pm.save_pretrained(pm.build(fit_to_tokenizer(get_preset(preset), tokenizer)), directory)
    tokenizer.save(directory)
    return directory


def test_every_tiny_preset_is_named():
    assert {p for p in pm.PRESETS if p.endswith("-tiny") or p == "paligemma-world"} == set(EXPORTS) | set(REFUSED)


@pytest.mark.parametrize("preset", sorted(EXPORTS))
def test_a_preset_with_an_hf_equivalent_is_written_as_it(preset, tokenizer, tmp_path, capsys):
    source = saved(preset, tokenizer, tmp_path / preset)
    assert main(["convert", "--to", "hf", str(source), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == EXPORTS[preset]
    assert {"model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}


@pytest.mark.parametrize("preset", sorted(REFUSED))
def test_a_preset_hf_has_no_architecture_for_is_refused_in_one_line(preset, tokenizer, tmp_path, capsys):
    source = saved(preset, tokenizer, tmp_path / preset)
    assert main(["convert", "--to", "hf", str(source), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("polymodal convert: error: ") and REFUSED[preset] in err and err.count("\n") == 1, err
    assert not (tmp_path / "hf").exists()
