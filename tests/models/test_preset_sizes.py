"""Every preset named after a published model has the published parameter count, counted on the meta
device (shapes only, nothing allocated). Each figure is checked to the digits it is published with.

KOSMOS-1: the paper gives "about 1.6B" in all (its decoder "about 1.3B"). At the documents' shapes
(resampler depth 2 with 8 heads, a bias-free image projection) the model counts 1.67B with the output
projection tied to the embeddings, as KOSMOS' own code builds it (unilm `unigptmodel_xl` goes through
fairseq's `base_gpt3_architecture`, which sets `share_decoder_input_output_embed`); an untied one would
add 64007 x 2048 = 131M, 1.80B, past the paper's figure.
"""

import re
from pathlib import Path

import pytest
import torch

import polymodal as pm

# preset: (published parameters, half a unit of the last published digit, where it is published)
PUBLISHED = {
    "gemma-2b": (2.51e9, 0.005e9, "Gemma report / HF google/gemma-2b: 2.51B"),
    "gemma-7b": (8.54e9, 0.005e9, "Gemma report / HF google/gemma-7b: 8.54B"),
    "llama-3.2-1b": (1.24e9, 0.005e9, "HF meta-llama/Llama-3.2-1B: 1.24B"),
    "paligemma-3b": (2.92e9, 0.005e9, "HF google/paligemma-3b-pt-224: 2.92B"),
    "idefics-9b": (8.93e9, 0.005e9, "HF HuggingFaceM4/idefics-9b: 8.93B"),
    "clip-vit-l-14": (428e6, 0.5e6, "HF openai/clip-vit-large-patch14: 428M"),
    # the Gemini report publishes counts but not shapes: the presets' guessed shapes within 1%
    "gemini-nano-1": (1.8e9, 0.018e9, "Gemini report: Nano-1 1.8B"),
    "gemini-nano-2": (3.25e9, 0.0325e9, "Gemini report: Nano-2 3.25B"),
}


def count(preset: str) -> tuple[int, torch.nn.Module]:
    with torch.device("meta"):
        model = pm.build(preset)
    return sum(p.numel() for p in model.parameters()), model


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_parameter_count_is_the_published_one(preset):
    published, tolerance, source = PUBLISHED[preset]
    n, _ = count(preset)
    assert abs(n - published) <= tolerance, f"{preset}: {n:,} parameters; {source}"


def test_gemma_7b_is_the_module_tree_paligemma_prints():
    n, model = count("gemma-7b")
    assert n == 8_537_680_896  # exactly HF GemmaForCausalLM's count at these shapes
    cfg = model.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.head_size, cfg.hidden_dim, cfg.vocab_size) == \
        (28, 3072, 16, 256, 24576, 256000)


def test_kosmos_1_counts_about_1_6b_with_its_tied_head():
    n, model = count("kosmos-1")
    cfg = model.config
    assert (cfg.perceiver.depth, cfg.perceiver.n_heads) == (2, 8)
    assert model.projector.bias is None and cfg.text.tie_embeddings and cfg.text.dropout == 0.1
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert 1.3e9 <= decoder < 1.4e9  # the paper's "about 1.3B" language model
    assert n == 1_670_703_104 and 1.6e9 <= n < 1.7e9  # the paper's "about 1.6B"
    untied = n + cfg.text.vocab_size * cfg.text.dim
    assert untied > 1.8e9  # an untied output projection would not fit the paper's figure


def test_gemini_tiny_usm_is_gemini_tiny_hearing_through_a_gemma_3n_audio_tower():
    """USM's Conformer counts as HF's `Gemma3nAudioEncoder` at its config (Gemma 3n's own sizes, and the
    tiny preset's); the rest of gemini-tiny-usm is gemini-tiny's."""
    transformers = pytest.importorskip("transformers", reason="HF's Gemma 3n audio tower is the reference count")
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder
    from polymodal.convert.hf_gemma3n_audio import conformer_config_to_hf
    from polymodal.encoders.conformer import ConformerConfig, ConformerEncoder

    def params(module):
        return sum(p.numel() for p in module.parameters())

    n, usm = count("gemini-tiny-usm")
    n_whisper, whisper = count("gemini-tiny")
    for cfg in (ConformerConfig(), usm.config.usm):
        with torch.device("meta"):
            hf = Gemma3nAudioEncoder(transformers.Gemma3nAudioConfig(**conformer_config_to_hf(cfg)))
            assert params(ConformerEncoder(cfg)) == params(hf)
    assert params(usm.audio) == params(hf)
    hearing = lambda m: params(m.audio) + params(m.audio_proj)  # noqa: E731
    assert n - hearing(usm) == n_whisper - hearing(whisper) > 0


def test_flamingo_palm_blocks_are_parallel_and_multi_query():
    """flamingo-pytorch's FlamingoPaLM: one bias-free LayerNorm per block (no second, MLP norm) and one K/V head."""
    n, model = count("flamingo-palm")
    text = model.config.text
    assert all(layer.mlp_norm is None for layer in model.decoder.layers)
    assert model.decoder.layers[0].attn.wqkv.weight.shape == ((text.n_heads + 2) * text.head_size, text.dim)
    with torch.device("meta"):
        sequential = pm.build(model.config.replace(text=text.replace(parallel_blocks=False)))
    assert sum(p.numel() for p in sequential.parameters()) - n == text.n_layers * text.dim


def test_the_readme_presets_table_gives_each_count_to_the_digit():
    """The README's "Presets" table writes every count in full: each is what the preset counts."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme[readme.index("| preset | parameters | published |"):]
    table = table[:table.index("\n\n")]
    rows = re.findall(r"^\| `([\w.-]+)`(?:, `([\w.-]+)`)?[^|]*\| ([\d,]+)(?: / ([\d,]+))? \|", table, re.M)
    stated = {name: int(value.replace(",", "")) for row in rows for name, value in (row[0::2], row[1::2]) if name}
    assert {"gemma-2b", "kosmos-1", "gemini-nano-2", "siglip-so400m-14-224"} <= set(stated)
    assert {name: count(name)[0] for name in stated} == stated
