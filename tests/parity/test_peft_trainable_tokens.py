"""Trainable token rows beside LoRA adapters (new tokens such as PaliGemma's `<locNNNN>`) against the real peft:
an adapter whose rows trained here loads into transformers + peft (`trainable_token_indices`) with the same
logits, tied heads (Gemma, PaliGemma) and untied (Llama) alike, and peft's load here."""

import json

import pytest
import torch
from safetensors import safe_open

import polymodal as pm
from polymodal.convert.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from polymodal.errors import InputError
from polymodal.nn.lora import TrainableRows, adapters, trained_rows

from test_peft_parity import checkpoint, inputs, logits, randomise_adapters  # noqa: F401 (checkpoint: a fixture)

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")
peft = pytest.importorskip("peft", reason="peft is the LoRA adapter reference")

ROWS = [40, 7, 12]  # not sorted: peft keeps the order given, row i of the saved tensor is token ROWS[i]


def hf_class(kind: str):
    return transformers.AutoModelForImageTextToText if kind == "paligemma" else transformers.AutoModelForCausalLM


def lm(model):
    return getattr(model, "decoder", model)


def batch_with_rows(kind: str) -> dict:
    batch = inputs(kind)
    batch["input_ids"][:, -4:-1] = torch.tensor(ROWS)  # the trained tokens are read ...
    return batch


def randomise_rows(model) -> None:
    with torch.no_grad():
        for rows in trained_rows(model).values():
            rows.trainable_tokens.copy_(torch.randn_like(rows.trainable_tokens))


def test_trained_rows_load_into_peft(checkpoint, tmp_path):
    kind, d = checkpoint
    ours = pm.add_lora(pm.from_pretrained(d), rank=2, alpha=4, targets=["q_proj", "v_proj"], trainable_tokens=ROWS)
    tied = kind != "llama"
    assert sorted(p.rsplit(".", 1)[-1] for p in trained_rows(ours)) == (
        ["tok_embeddings"] if tied else ["output", "tok_embeddings"])
    randomise_adapters(ours)
    randomise_rows(ours)
    pm.save_adapter(ours, tmp_path / "adapter", base_model=d)
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["trainable_token_indices"] == (ROWS if tied else {"embed_tokens": ROWS, "lm_head": ROWS})
    with safe_open(tmp_path / "adapter" / ADAPTER_WEIGHTS, framework="pt") as f:
        saved = [k for k in f.keys() if "token_adapter" in k]
    assert len(saved) == (1 if tied else 2)
    batch = batch_with_rows(kind)
    ref = peft.PeftModel.from_pretrained(hf_class(kind).from_pretrained(d), tmp_path / "adapter").eval()
    want = logits(ref, batch)
    assert (logits(ours, batch) - want).abs().max() <= 1e-4
    for name in ("embed_tokens", "lm_head"):  # ... and written: the head's rows of these tokens are the trained ones
        assert any(name in key for key in saved) or (name == "lm_head" and tied)
    with torch.no_grad():
        for rows in trained_rows(ours).values():
            rows.trainable_tokens.copy_(rows.weight[rows.token_indices])
    assert (logits(ours, batch) - want).abs().max() > 1e-2  # the rows change the logits
    loaded = pm.from_pretrained(tmp_path / "adapter")  # the directory alone, through load_adapter
    assert (logits(loaded, batch) - want).abs().max() <= 1e-4


def test_peft_trainable_tokens_load_here(checkpoint, tmp_path):
    kind, d = checkpoint
    tokens = {"embed_tokens": ROWS, "lm_head": ROWS[:2]} if kind == "llama" else ROWS
    ref = peft.get_peft_model(hf_class(kind).from_pretrained(d),
                              peft.LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj"],
                                              trainable_token_indices=tokens)).eval()
    randomise_adapters(ref)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn_like(p))
    ref.save_pretrained(tmp_path / "peft")
    ours = pm.load_adapter(pm.from_pretrained(d), tmp_path / "peft")
    assert [r.token_indices.tolist() for _, r in sorted(trained_rows(ours).items())] == (
        [ROWS[:2], ROWS] if kind == "llama" else [ROWS])
    batch = batch_with_rows(kind)
    want = logits(ref, batch)
    assert (logits(ours, batch) - want).abs().max() <= 1e-4
    pm.merge_lora(ours)
    assert not trained_rows(ours) and type(lm(ours).tok_embeddings) is torch.nn.Embedding
    assert (logits(ours, batch) - logits(ref.merge_and_unload(), batch)).abs().max() <= 1e-4


def test_only_the_rows_and_the_adapters_train(checkpoint):
    kind, d = checkpoint
    model = pm.add_lora(pm.from_pretrained(d), rank=2, targets=["q_proj"], trainable_tokens=ROWS)
    batch = batch_with_rows(kind)
    labels = batch["input_ids"].clone()
    if kind == "paligemma":
        labels[batch["token_type_ids"] == 0] = -100
    model.train()
    model(**batch, labels=labels).loss.backward()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or name.endswith("trainable_tokens") for name in trained)
    for rows in trained_rows(model).values():
        assert rows.weight.grad is None and rows.trainable_tokens.grad.abs().sum(1).gt(0).all()
    assert isinstance(lm(model).tok_embeddings, TrainableRows)
    prefix = "decoder." if kind == "paligemma" else ""
    assert f"{prefix}tok_embeddings.weight" in model.state_dict()  # the base keys stay as they are


def test_bad_rows_are_refused_before_the_model_changes(checkpoint):
    _, d = checkpoint
    model = pm.from_pretrained(d)
    vocab = lm(model).tok_embeddings.weight.shape[0]
    with pytest.raises(InputError, match=rf"distinct ids in \[0, {vocab}\), got \[{vocab}\]"):
        pm.add_lora(model, rank=2, trainable_tokens=[vocab])
    assert not adapters(model) and not trained_rows(model)
    with pytest.raises(InputError, match="non-empty list of token ids"):
        pm.add_lora(pm.from_pretrained(d), rank=2, trainable_tokens=["<loc0000>"])
