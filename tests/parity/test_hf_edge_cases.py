"""HF checkpoint dirs with unusual but valid configs, and generate's edge cases, against HF transformers:
legacy Gemma configs, tied heads saved anyway, options polymodal cannot honour (clear errors, never silently
different logits), bf16 models' RoPE, several stop tokens, one new token, a row that stops at once."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import polymodal as pm
from polymodal.config import ConfigError

import causal_lm  # tests/parity/causal_lm.py
from randomise import randomise  # tests/parity/randomise.py

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def save_hf_model(directory, kind: str = "llama", **overrides):
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, **overrides}))
    else:
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**{**COMMON, "head_dim": 8, **overrides}))
    randomise(model, "norm", "bias")
    model.save_pretrained(directory)
    return model.eval()


def edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def batch():
    return causal_lm.batch(torch.Generator().manual_seed(1))


def max_logit_diff(hf, ours) -> float:
    ids, am = batch()
    with torch.no_grad():
        return float((hf(input_ids=ids, attention_mask=am).logits - ours(ids, attention_mask=am).logits)[am.bool()]
                     .abs().max())


@pytest.mark.parametrize("activation_keys", [{"hidden_act": "gelu"}, {"hidden_act": "gelu", "hidden_activation": None},
                                             {"hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh"}])
def test_legacy_gemma_gelu_config_loads_as_hf_reads_it(tmp_path, activation_keys):
    """The first Gemma releases wrote hidden_act "gelu", which HF reads as the tanh approximation."""
    save_hf_model(tmp_path, "gemma")
    edit_config(tmp_path, **activation_keys)
    hf = transformers.GemmaForCausalLM.from_pretrained(tmp_path).eval()
    assert max_logit_diff(hf, pm.from_pretrained(tmp_path)) <= 1e-4


def test_bidirectional_gemma_is_a_clear_error(tmp_path):
    save_hf_model(tmp_path, "gemma", use_bidirectional_attention=True)
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        pm.from_pretrained(tmp_path)


def resave_with_head(directory, embed_key: str, shift: float) -> None:
    state = load_file(directory / "model.safetensors")
    state["lm_head.weight"] = state[embed_key] + shift
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def test_tied_head_saved_anyway_loads_when_it_equals_the_embeddings(tmp_path):
    save_hf_model(tmp_path, tie_word_embeddings=True)
    resave_with_head(tmp_path, "model.embed_tokens.weight", 0.0)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert max_logit_diff(hf, pm.from_pretrained(tmp_path)) <= 1e-4


def test_tied_head_that_differs_from_the_embeddings_is_a_clear_error(tmp_path):
    """HF unties such a checkpoint (with a warning) and so gives other logits than a tied model: refuse it."""
    save_hf_model(tmp_path, tie_word_embeddings=True)
    resave_with_head(tmp_path, "model.embed_tokens.weight", 0.5)
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        pm.from_pretrained(tmp_path)


def tiny_paligemma(directory, text_type: str = "gemma"):
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                  patch_size=4)
    text = dict(model_type=text_type, vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=1, head_dim=8)
    cfg = transformers.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=99, projection_dim=32)
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(cfg)
    model.save_pretrained(directory)
    return model.eval()


def test_paligemma_tied_head_that_differs_is_not_silently_dropped(tmp_path):
    """It was ignored: HF used it (untied), ours the embeddings, logits 6 apart."""
    tiny_paligemma(tmp_path)
    resave_with_head(tmp_path, "language_model.model.embed_tokens.weight", 0.5)
    with pytest.raises(ValueError, match="language_model.lm_head.weight differs"):
        pm.from_pretrained(tmp_path)


def test_paligemma_2_is_a_clear_error(tmp_path):
    tiny_paligemma(tmp_path, "gemma2")
    with pytest.raises(ConfigError, match="text_config.model_type 'gemma2' is not supported"):
        pm.from_pretrained(tmp_path)


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 1024}])
def test_bf16_model_keeps_float32_rope_frequencies_as_hf(tmp_path, rope):
    """HF's from_pretrained(dtype=bfloat16) keeps RoPE frequencies float32; ours were cast with the weights, and
    the cos/sin tables at position 4000 were up to 0.7 off."""
    save_hf_model(tmp_path, max_position_embeddings=8192, **({"rope_parameters": rope} if rope else {}))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    positions = torch.arange(8192)[None]
    cos, sin = hf.model.rotary_emb(torch.zeros(1, 1, dtype=torch.bfloat16), positions)
    for ours in (pm.from_pretrained(tmp_path, dtype=torch.bfloat16), pm.from_pretrained(tmp_path).bfloat16()):
        tables = ours.rotary(positions, torch.bfloat16)
        assert torch.equal(tables.cos_q[:, 0], cos) and torch.equal(tables.sin_q[:, 0], sin)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    hf = save_hf_model(directory)
    return hf, pm.from_pretrained(directory)


@pytest.mark.parametrize("case", ["two-stop-ids", "one-new-token", "row-stops-at-once", "penalty-two-stop-ids"])
def test_greedy_stop_cases_match_hf(llama_pair, case):
    hf, ours = llama_pair
    ids, am = batch()
    free = hf.generate(input_ids=ids, attention_mask=am, max_new_tokens=12, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[:, ids.shape[1]:]
    first_of_row1, fourth_of_row0 = int(free[1, 0]), int(free[0, 3])
    kwargs = {"two-stop-ids": dict(max_new_tokens=12, eos_token_id=[fourth_of_row0, first_of_row1]),
              "one-new-token": dict(max_new_tokens=1, eos_token_id=2),
              "row-stops-at-once": dict(max_new_tokens=12, eos_token_id=first_of_row1),
              "penalty-two-stop-ids": dict(max_new_tokens=12, eos_token_id=[fourth_of_row0, first_of_row1],
                                           repetition_penalty=1.5)}[case]
    expected = hf.generate(input_ids=ids, attention_mask=am, do_sample=False, pad_token_id=0, **kwargs)[:, 10:]
    got = pm.generate(ours, ids, am, pad_token_id=0, **kwargs)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("pad", ["never-generated", "first-choice-of-the-most-padded-row"])
def test_repetition_penalty_with_pad_equal_to_eos_on_a_left_padded_batch(llama_pair, pad):
    """HF's generate leaves a prompt's left padding out of the tokens its repetition penalty counts as seen
    (`prompt_ignore_length` = the padding lengths), and so does polymodal. With pad == eos the choice shows: were
    pads counted, the most padded row's first choice, used as the pad id, would be penalised and not picked.
    16 new tokens, every row compared token for token, the rows that do not stop running all 16."""
    hf, ours = llama_pair
    ids, am = batch()
    free = pm.generate(ours, ids, am, max_new_tokens=16, repetition_penalty=1.5)
    if pad == "never-generated":
        token = next(t for t in range(3, 128) if t not in free and t not in ids)
    else:
        token = int(free[2, 0])
        assert token not in ids[2, am[2].bool()]  # seen only if the padding counts
    padded = ids.masked_fill(am == 0, token)
    kwargs = dict(max_new_tokens=16, eos_token_id=token, pad_token_id=token, repetition_penalty=1.5)
    expected = hf.generate(input_ids=padded, attention_mask=am, do_sample=False, **kwargs)[:, padded.shape[1]:]
    got = pm.generate(ours, padded, am, **kwargs)
    assert expected.shape == (3, 16) and got.tolist() == expected.tolist()
    stopped_at_once = (expected[:, 0] == token).tolist()
    assert stopped_at_once == ([False] * 3 if pad == "never-generated" else [False, False, True])
