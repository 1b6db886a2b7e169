"""PaliGemma: HF dir -> pm.from_pretrained -> same logits (prefix + suffix + left padding) and greedy tokens."""

import pytest
import torch

import polymodal as pm
from polymodal.convert.hf import save_hf
from polymodal.serialization import save_state_dict

from randomise import randomise  # tests/parity/randomise.py

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")

IMAGE_TOKEN, N_IMG = 99, 16  # 16x16 images, patch 4 -> 16 tokens per image


def hf_paligemma():
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=4)
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    cfg = transformers.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                       projection_dim=32)
    model = transformers.PaliGemmaForConditionalGeneration(cfg)
    randomise(model, "norm", "bias")
    return model.eval()


def batch(prefix_lens=(3, 6, 1), suffix_lens=(4, 2, 0)):
    """Rows of [image tokens, bos, prefix, suffix], left-padded to one width."""
    rows, types = [], []
    for p, s in zip(prefix_lens, suffix_lens):
        prefix = [IMAGE_TOKEN] * N_IMG + [2] + torch.randint(3, 99, (p,)).tolist()
        rows.append(prefix + torch.randint(3, 99, (s,)).tolist())
        types.append([0] * len(prefix) + [1] * s)
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    am = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    tt = torch.tensor([[0] * (width - len(t)) + t for t in types])
    return ids, am, tt, torch.randn(len(rows), 3, 16, 16)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = hf_paligemma()
    d = tmp_path_factory.mktemp("pg")
    hf.save_pretrained(d)
    return hf, pm.from_pretrained(d)


def test_logits_match_with_prefix_suffix_and_padding(pair):
    hf, ours = pair
    ids, am, tt, px = batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, attention_mask=am, token_type_ids=tt).logits
        got = ours(ids, px, attention_mask=am, token_type_ids=tt).logits
    assert (got - ref)[am.bool()].abs().max() <= 1e-4


def test_loss_matches(pair):
    hf, ours = pair
    ids, am, tt, px = batch()
    labels = ids.masked_fill((tt == 0) | (am == 0), -100)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, attention_mask=am, token_type_ids=tt, labels=labels).loss
        got = ours(ids, px, attention_mask=am, token_type_ids=tt, labels=labels).loss
    assert abs(float(ref) - float(got)) <= 1e-5


@pytest.mark.parametrize("with_types", [True, False])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_greedy_generation_matches(pair, with_types, padding_side):
    """HF's processor gives an all-zero token_type_ids for a prompt; without them ours treats the prompt alike."""
    hf, ours = pair
    ids, am, tt, px = batch(suffix_lens=(0, 0, 0))
    ref = hf.generate(input_ids=ids, attention_mask=am, pixel_values=px, token_type_ids=tt, max_new_tokens=10,
                      do_sample=False, pad_token_id=0, eos_token_id=1)[:, ids.shape[1]:]
    if padding_side == "right":  # the engine moves the padding to the left
        order = am.argsort(dim=1, descending=True, stable=True)
        ids, am, tt = (t.gather(1, order) for t in (ids, am, tt))
    extra = dict(token_type_ids=tt) if with_types else {}
    got = pm.generate(ours, ids, am, pixel_values=px, max_new_tokens=10, pad_token_id=0, eos_token_id=1, **extra)
    assert got[:, : ref.shape[1]].tolist() == ref.tolist()


def test_round_trip_to_hf_is_identical(pair, tmp_path):
    hf, ours = pair
    save_hf(ours, tmp_path / "back", "paligemma")
    back = type(hf).from_pretrained(tmp_path / "back").eval()
    ids, am, tt, px = batch()
    with torch.no_grad():
        a = back(input_ids=ids, pixel_values=px, attention_mask=am, token_type_ids=tt).logits
        b = hf(input_ids=ids, pixel_values=px, attention_mask=am, token_type_ids=tt).logits
    assert torch.equal(a, b)


def test_sharded_checkpoint_loads(tmp_path):
    torch.manual_seed(1)
    hf = hf_paligemma()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = pm.from_pretrained(tmp_path)
    ids, am, tt, px = batch()
    with torch.no_grad():
        diff = ours(ids, px, attention_mask=am, token_type_ids=tt).logits - hf(
            input_ids=ids, pixel_values=px, attention_mask=am, token_type_ids=tt).logits
    assert diff[am.bool()].abs().max() <= 1e-4


def test_in_memory_key_layout_loads(pair, tmp_path):
    """`model.vision_tower.`, `model.language_model.`, `lm_head.`: the keys of HF's state_dict()."""
    hf, ours = pair
    state = {k: v.clone() for k, v in hf.state_dict().items()}  # the tied lm_head.weight included
    assert any(k.startswith("model.language_model.") for k in state) and "lm_head.weight" in state
    save_state_dict(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf.config.to_json_file(tmp_path / "config.json")
    loaded = pm.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))
