"""Hostile sweep, Python API: every family's forward and generate with non-finite, mis-typed and mis-shaped media,
token ids and masks; losses with nothing to predict; generate settings, configs, LoRA settings and adapter
directories with bad values; from_pretrained on what is not a checkpoint. One tiny model per family, built once."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.data.documents import Audio, Document, Segment
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import (CheckpointError, ConfigError, InputError, InputTypeError, MissingFileError,
                              PolymodalError, UnknownNameError)
from polymodal.presets import get_preset
from sweep_judge import judge

WORLD = World(seed=0)
NAN, INF = float("nan"), float("inf")
FAMILIES = ("paligemma-tiny", "kosmos-tiny", "gemini-tiny", "chameleon-tiny", "flamingo-tiny", "clip-tiny",
            "llama-tiny")


def document(family: str) -> Document:
    image = WORLD.draw("red", "circle")
    if family == "gemini-tiny":  # every modality it reads
        beep = Audio((0.3 * np.sin(np.arange(8000) / 5)).astype(np.float32), 16000)
        return Document([Segment("image", media=image), Segment("audio", media=beep),
                         Segment("video", media=[image, image]), Segment("text", "what is it?"),
                         Segment("text", "a red circle", target=True)])
    if family == "llama-tiny":
        return Document([Segment("text", "what is it?"), Segment("text", "a red circle", target=True)])
    if family == "clip-tiny":
        return Document([Segment("image", media=image), Segment("text", "a red circle")])
    return Document([Segment("image", media=image), Segment("text", "what is it?"),
                     Segment("text", "a red circle", target=True)])


@pytest.fixture(scope="module")
def families():
    """family -> (model, a batch of two documents it reads, the tokenizer)."""
    tokenizer = Tokenizer.train(WORLD.texts(), vocab_size=320)
    out = {}
    for family in FAMILIES:
        config = fit_to_tokenizer(get_preset(family), tokenizer)
        if family == "gemini-tiny":
            config = config.replace(vq=None, tokens=config.tokens.replace(draw=None))
        torch.manual_seed(0)
        model = pm.build(config).eval()
        batch = make_collator(config, tokenizer)([document(family)] * 2)
        out[family] = (model, dict(batch), tokenizer)
    return out


def media_keys(batch: dict) -> list[str]:
    return [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            or k == "pixel_values_videos"]


def spoiled(value, how: str):
    """A float media tensor (or a list of them, videos) spoiled one way."""
    if isinstance(value, list):
        return [spoiled(v, how) for v in value]
    v = value.contiguous().clone()
    if how in ("nan", "inf", "-inf"):
        v.view(-1)[v.numel() // 2] = float(how)
        return v
    if how == "shape":
        return v[0]
    if how == "numpy":
        return v.numpy()
    return v.to({"long": torch.long, "uint8": torch.uint8, "bool": torch.bool}[how])


MEDIA_SPOILS = {"nan": (InputError, "finite numbers"), "inf": (InputError, "finite numbers"),
                "-inf": (InputError, "finite numbers"), "long": (InputError, "floating-point"),
                "uint8": (InputError, "floating-point"), "bool": (InputError, "floating-point"),
                "shape": (InputError, ""), "numpy": (InputTypeError, "must be a torch.Tensor")}
MEDIA = {"paligemma-tiny": ["pixel_values"], "kosmos-tiny": ["pixel_values"], "chameleon-tiny": ["pixel_values"],
         "flamingo-tiny": ["pixel_values"], "clip-tiny": ["pixel_values"],
         "gemini-tiny": ["pixel_values", "input_features", "pixel_values_videos"]}


def call(model, batch: dict, **change):
    inputs = {k: v for k, v in {**batch, **change}.items() if k != "labels" or "labels" in change}
    return model(**inputs)


@pytest.mark.parametrize("family, key, how", [
    pytest.param(f, k, h, id=f"{MEDIA_SPOILS[h][0].__name__}-{f}-{k}-{h}") for f, keys in MEDIA.items()
    for k in keys for h in MEDIA_SPOILS])
def test_spoiled_media_is_refused_before_compute(families, family, key, how):
    model, batch, _ = families[family]
    error, match = MEDIA_SPOILS[how]
    judge(lambda: call(model, batch, **{key: spoiled(batch[key], how)}), error, match)


@pytest.mark.parametrize("family", [pytest.param(f, id=f"result-{f}-half-precision-media") for f in MEDIA])
def test_half_precision_media_is_read(families, family):
    model, batch, _ = families[family]
    half = {k: batch[k].half() if not isinstance(batch[k], list) else [v.half() for v in batch[k]]
            for k in MEDIA[family]}
    out = judge(lambda: call(model, batch, **half), None)
    tensors = [t for t in vars(out).values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)


@pytest.mark.parametrize("family", [pytest.param(f, id=f"result-{f}-labels-all-ignored-loss-0")
                                    for f in FAMILIES if f != "clip-tiny"])
def test_a_loss_with_nothing_to_predict_is_zero_with_zero_gradients(families, family):
    """The README's choice: a batch whose labels are all -100 costs exactly 0 and moves no weight."""
    model, batch, _ = families[family]
    model.zero_grad()
    loss = judge(lambda: call(model, batch, labels=torch.full_like(batch["labels"], -100)).loss, None)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    model.zero_grad()


def token_spoils(batch: dict, V: int) -> dict:
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    spoils = {
        "ids-past-vocabulary": ({"input_ids": ids.masked_fill(ids == ids[0, -1], V)}, InputError),
        "ids-negative": ({"input_ids": ids.masked_fill(ids == ids[0, -1], -5)}, InputError),
        "ids-float": ({"input_ids": ids.float()}, InputError),
        "ids-1d": ({"input_ids": ids[0]}, InputError),
        "ids-list": ({"input_ids": ids.tolist()}, InputError),
    }
    if mask is not None:
        spoils |= {
            "mask-wrong-shape": ({"attention_mask": mask[:, :-1]}, InputError),
            "mask-list": ({"attention_mask": mask.tolist()}, InputError),
            "mask-value-2": ({"attention_mask": mask * 2}, InputError),
            "mask-float-half": ({"attention_mask": mask.float() * 0.5}, InputError),
        }
    return spoils


TOKEN_CASES = ["ids-past-vocabulary", "ids-negative", "ids-float", "ids-1d", "ids-list", "mask-wrong-shape",
               "mask-list", "mask-value-2", "mask-float-half"]


@pytest.mark.parametrize("family, case", [pytest.param(f, c, id=f"InputError-{f}-{c}") for f in FAMILIES
                                          for c in TOKEN_CASES])
def test_bad_token_ids_and_masks_are_refused(families, family, case):
    model, batch, _ = families[family]
    V = getattr(model.config, "vocab_size", None) or model.config.text.vocab_size
    spoils = token_spoils(batch, V)
    if case not in spoils:
        pytest.skip(f"{family}'s batch has no attention_mask")
    change, error = spoils[case]
    judge(lambda: call(model, batch, **change), error)


# ---------------------------------------------------------------------------------------------
# generate

GENERATE = {  # setting -> [(value, valid)]
    "max_new_tokens": [(0, False), (-1, False), (1.5, False), (NAN, False), (True, False), ("4", False), (2, True),
                       (10 ** 6, False)],
    "temperature": [(NAN, False), (INF, False), (-0.5, False), (0.0, False), ("1", False), (0.7, True)],
    "top_k": [(0, False), (-3, False), (2.5, False), (NAN, False), (True, False), (5, True)],
    "top_p": [(0.0, False), (1.5, False), (NAN, False), (-INF, False), ("0.9", False), (0.9, True), (1.0, True)],
    "repetition_penalty": [(0.0, False), (-1.0, False), (NAN, False), (INF, False), (1.2, True)],
    "seed": [(-1, False), (2 ** 64, False), (2 ** 70, False), (1.5, False), (NAN, False), ("7", False), (True, False),
             (2 ** 64 - 1, True), (0, True)],
    "eos_token_id": [(-1, False), (10 ** 6, False), ([2, 10 ** 6], False), (2, True)],
    "pad_token_id": [(-1, False), (10 ** 6, False), (0, True)],
    "num_assistant_tokens": [(0, False), (-2, False), (1.5, False)],
    "prompt_lookup_num_tokens": [(0, False), (-1, False), (2.5, False), (True, False), (2, True)],
}


@pytest.mark.parametrize("setting, value, valid", [
    pytest.param(s, v, ok, id=f"{'result' if ok else 'InputError'}-generate-{s}={v!r}")
    for s, cases in GENERATE.items() for v, ok in cases])
def test_generate_settings(families, setting, value, valid):
    model, batch, tokenizer = families["llama-tiny"]
    sampled = setting in ("temperature", "top_k", "top_p", "seed")
    run = lambda: pm.generate(model, batch["input_ids"], attention_mask=batch["attention_mask"],
                              do_sample=sampled, **{"max_new_tokens": 2, setting: value})
    if not valid:
        judge(run, InputError, setting)
        return
    new = judge(run, None)
    assert new.shape[0] == 2 and new.shape[1] <= (value if setting == "max_new_tokens" else 2)
    assert ((new >= 0) & (new < model.config.vocab_size)).all()


def test_a_draft_of_another_family_is_named_as_the_problem(families):
    target, batch, _ = families["paligemma-tiny"]
    gemini = families["gemini-tiny"][0].config
    draft = pm.build(gemini.replace(text=gemini.text.replace(vocab_size=target.config.text.vocab_size))).eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")}
    judge(lambda: pm.generate(target, **inputs, max_new_tokens=2, assistant_model=draft), InputError,
          "the draft (assistant_model, a Gemini")


@pytest.mark.parametrize("draft_vocab", [pytest.param(v, id=f"InputError-draft-vocabulary-{v}") for v in (100, 321)])
def test_a_draft_of_another_vocabulary_is_named(families, draft_vocab):
    model, batch, _ = families["llama-tiny"]
    draft = pm.build(model.config.replace(vocab_size=draft_vocab)).eval()
    judge(lambda: pm.generate(model, batch["input_ids"], max_new_tokens=2, assistant_model=draft), InputError,
          "the draft's vocabulary")


# ---------------------------------------------------------------------------------------------
# configs

CONFIG_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len", "norm_eps", "rope_theta",
                 "init_std")
BAD_NUMBERS = (NAN, INF, -INF, -1, 0, "8", True, None, 1e300)


def valid_config_value(name: str, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return False
    integer = name in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len")
    return not integer or isinstance(value, int)


@pytest.mark.parametrize("field, value", [
    pytest.param(f, v, id=f"ConfigError-DecoderConfig-{f}={v!r}") for f in CONFIG_FIELDS for v in BAD_NUMBERS
    if not valid_config_value(f, v)])
def test_bad_config_numbers(field, value):
    judge(lambda: DecoderConfig(**{field: value}), ConfigError, field)


def test_huge_but_finite_sizes_are_refused_before_allocating():
    judge(lambda: pm.build(DecoderConfig(dim=2 ** 20, n_layers=2 ** 10, n_heads=2 ** 10, hidden_dim=2 ** 20)),
          ConfigError, "")


@pytest.mark.parametrize("name", [pytest.param(n, id=f"UnknownNameError-preset-{n!r}")
                                  for n in ("gpt-4", "", "PALIGEMMA-TINY", "paligemma_tiny")])
def test_unknown_presets(name):
    judge(lambda: pm.build(name), UnknownNameError, "unknown preset")


@pytest.mark.parametrize("value", [pytest.param(v, id=f"InputTypeError-build-{type(v).__name__}")
                                   for v in (3, None, {"dim": 8}, ["llama-tiny"])])
def test_build_takes_a_config_or_a_preset_name(value):
    judge(lambda: pm.build(value), InputTypeError)


# ---------------------------------------------------------------------------------------------
# LoRA and adapters

LORA = {"rank": [0, -1, 1.5, NAN, True, "8"], "alpha": [NAN, INF, 0, -1.0, "16"], "dropout": [NAN, -0.1, 1.0, 2],
        "targets": ["q_proj", ["nope"], [5]], "parts": [["nowhere"], "decoder"]}


@pytest.mark.parametrize("setting, value", [
    pytest.param(s, v, id=f"InputError-add_lora-{s}={v!r}") for s, values in LORA.items() for v in values])
def test_bad_lora_settings(families, setting, value):
    model = pm.build(families["llama-tiny"][0].config)
    judge(lambda: pm.add_lora(model, **{setting: value}), InputError, "")
    assert not any(n for n, _ in model.named_parameters() if "lora" in n), "the model changed before the error"


@pytest.fixture(scope="module")
def adapter(families, tmp_path_factory):
    """A LoRA adapter directory written for llama-tiny."""
    directory = tmp_path_factory.mktemp("adapter")
    model = pm.add_lora(pm.build(families["llama-tiny"][0].config), rank=2)
    pm.save_adapter(model, directory)
    return directory


ADAPTER_CONFIG = {"r": [0, -2, 2.5, NAN, None, "2"], "lora_alpha": [NAN, INF, -INF, 0, -4, "x", None],
                  "lora_dropout": [NAN, 1.0, -0.5], "use_rslora": ["yes", 1], "peft_type": ["PREFIX_TUNING", None],
                  "use_dora": [True]}


@pytest.mark.parametrize("key, value", [pytest.param(k, v, id=f"InputError-adapter_config-{k}={v!r}")
                                        for k, values in ADAPTER_CONFIG.items() for v in values])
def test_bad_adapter_configs_are_refused(families, adapter, tmp_path, key, value):
    (tmp_path / "a").mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    model = pm.build(families["llama-tiny"][0].config)
    judge(lambda: pm.load_adapter(model, tmp_path / "a"), InputError, key)


def spoiled_adapter(adapter, tmp_path, how: str):
    from safetensors.torch import load_file
    tensors = load_file(adapter / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    if how == "nan":
        tensors[first] = tensors[first].clone().fill_(NAN)
    elif how == "inf":
        tensors[first] = tensors[first].clone().fill_(INF)
    elif how == "int":
        tensors[first] = tensors[first].long()
    elif how == "bool":
        tensors[first] = tensors[first] > 0
    elif how == "shape":
        tensors[first] = tensors[first][:, :-1].contiguous()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    if how in ("truncated", "garbage"):
        data = (adapter / "adapter_model.safetensors").read_bytes()
        (tmp_path / "a" / "adapter_model.safetensors").write_bytes(data[:len(data) // 2] if how == "truncated"
                                                                   else b"\x00" * 64)
    else:
        save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    if how == "bad json":
        (tmp_path / "a" / "adapter_config.json").write_text('{"r": 2,')
    return tmp_path / "a"


ADAPTER_FILES = {"nan": (InputError, "finite"), "inf": (InputError, "finite"), "int": (InputError, "floating-point"),
                 "bool": (InputError, "floating-point"), "shape": (InputError, "an adapter for another model"),
                 "truncated": (CheckpointError, "not a readable safetensors"),
                 "garbage": (CheckpointError, "not a readable safetensors"), "bad json": (InputError, "not valid JSON")}


@pytest.mark.parametrize("how", [pytest.param(h, id=f"{e.__name__}-adapter-weights-{h}")
                                 for h, (e, _) in ADAPTER_FILES.items()])
def test_bad_adapter_files_are_refused_before_the_model_changes(families, adapter, tmp_path, how):
    model = pm.build(families["llama-tiny"][0].config)
    error, match = ADAPTER_FILES[how]
    judge(lambda: pm.load_adapter(model, spoiled_adapter(adapter, tmp_path, how)), error, match)
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_an_adapter_for_another_family_is_refused(families, adapter):
    model = pm.build(families["kosmos-tiny"][0].config)
    judge(lambda: pm.load_adapter(model, adapter), InputError, "adapter for another model")


# ---------------------------------------------------------------------------------------------
# from_pretrained on what is not a checkpoint (its loading internals are tests/test_serialization.py's)

@pytest.mark.parametrize("what", [pytest.param(w, id=f"MissingFileError-from_pretrained-{w}")
                                  for w in ("missing", "a file", "empty folder", "adapter without base")])
def test_from_pretrained_on_what_is_no_checkpoint(tmp_path, what):
    target = tmp_path / "x"
    if what == "a file":
        target.write_text("{}")
    elif what == "empty folder":
        target.mkdir()
    elif what == "adapter without base":
        target.mkdir()
        (target / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                                "base_model_name_or_path": str(tmp_path / "gone")}))
        (target / "adapter_model.safetensors").write_bytes(b"")
    message = judge(lambda: pm.from_pretrained(target), MissingFileError)
    assert str(target) in message


def test_the_error_family_is_public_and_complete():
    """Users catch the family, and the built-in types they caught before."""
    assert issubclass(MissingFileError, FileNotFoundError) and issubclass(InputTypeError, TypeError)
    assert issubclass(UnknownNameError, KeyError) and all(issubclass(e, PolymodalError) for e in (
        ConfigError, InputError, CheckpointError, MissingFileError, InputTypeError, UnknownNameError))
