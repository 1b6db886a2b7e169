"""LoRA adapters against the real peft package, on HF checkpoint directories (Llama, Gemma, PaliGemma):
an adapter trained here loads into transformers + peft with the same logits, and a peft adapter loads here."""

import json

import pytest
import torch

import polymodal as pm
from polymodal.convert.peft import ADAPTER_CONFIG
from polymodal.nn.lora import adapters

from randomise import randomise  # tests/parity/randomise.py
from test_paligemma_parity import IMAGE_TOKEN, hf_paligemma

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")
peft = pytest.importorskip("peft", reason="peft is the LoRA adapter reference")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_decoder(kind: str):
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, attention_bias=True))
    else:
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**common, head_dim=8))
    randomise(model, "norm")
    return model.eval()


def inputs(kind: str) -> dict:
    torch.manual_seed(1)
    if kind != "paligemma":
        return {"input_ids": torch.randint(3, 128, (2, 9))}
    ids = torch.tensor([[IMAGE_TOKEN] * 16 + [2] + torch.randint(3, 99, (6,)).tolist()] * 2)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16),
            "token_type_ids": torch.cat([torch.zeros(2, 20, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)], 1)}


def randomise_adapters(model: torch.nn.Module) -> None:
    """B starts at zero (the adapter is a no-op): give every A and B random values, as training would."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module", params=["llama", "gemma", "paligemma"])
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = hf_paligemma() if request.param == "paligemma" else hf_decoder(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, d


def test_polymodal_adapter_loads_into_peft(checkpoint, tmp_path):
    kind, d = checkpoint
    targets = ["q_proj", "v_proj", "linear"] if kind == "paligemma" else TARGETS
    parts = ["vision", "projector", "decoder"] if kind == "paligemma" else None
    ours = pm.add_lora(pm.from_pretrained(d), rank=4, alpha=8, targets=targets, parts=parts)
    randomise_adapters(ours)
    pm.save_adapter(ours, tmp_path / "adapter", base_model=d)
    batch = inputs(kind)
    ref = peft.PeftModel.from_pretrained(transformers.AutoModelForImageTextToText.from_pretrained(d) if kind == "paligemma"
                                         else transformers.AutoModelForCausalLM.from_pretrained(d),
                                         tmp_path / "adapter").eval()
    n_adapted = sum(1 for name, _ in ref.named_parameters() if "lora_A" in name)
    assert n_adapted == sum(len(m.slices) for m in adapters(ours).values())
    got, want = logits(ours, batch), logits(ref, batch)
    assert (got - want).abs().max() <= 1e-4
    with ref.disable_adapter():
        assert (want - logits(ref, batch)).abs().max() > 1e-2  # the adapter changes the logits
    # the directory alone (base_model_name_or_path) gives the same model
    assert (logits(pm.from_pretrained(tmp_path / "adapter"), batch) - want).abs().max() <= 1e-4


def test_peft_adapter_loads_into_polymodal(checkpoint, tmp_path):
    kind, d = checkpoint
    hf = (transformers.AutoModelForImageTextToText if kind == "paligemma" else transformers.AutoModelForCausalLM
          ).from_pretrained(d)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "linear"] if kind == "paligemma" else ["k_proj", "down_proj", "up_proj"]
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=5, target_modules=targets)).eval()
    randomise_adapters(ref)
    ref.save_pretrained(tmp_path / "peft")
    ours = pm.load_adapter(pm.from_pretrained(d), tmp_path / "peft")
    batch = inputs(kind)
    want = logits(ref, batch)
    assert (logits(ours, batch) - want).abs().max() <= 1e-4
    pm.merge_lora(ours)  # and merged into the weights, as peft's merge_and_unload
    assert not adapters(ours)
    assert (logits(ours, batch) - logits(ref.merge_and_unload(), batch)).abs().max() <= 1e-4


def test_adapter_config_is_peft_readable(checkpoint, tmp_path):
    kind, d = checkpoint
    ours = pm.add_lora(pm.from_pretrained(d), rank=3, alpha=6, targets=["q", "v"])
    pm.save_adapter(ours, tmp_path / "adapter")
    config = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
    assert (config.r, config.lora_alpha, config.peft_type) == (3, 6, peft.PeftType.LORA)
    written = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["target_modules"]
    assert len(written) == 2 * 2 and all(name.endswith(("q_proj", "v_proj")) for name in written)
