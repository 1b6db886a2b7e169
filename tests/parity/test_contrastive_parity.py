"""CLIP and SigLIP dual encoders: HF dir -> pm.from_pretrained -> same embeddings, logits, loss and
gradients; polymodal -> HF dir gives back the same tensors."""

import pytest
import torch
import torch.nn.functional as F

import polymodal as pm
from polymodal.config import ConfigError
from polymodal.convert.hf import FAMILIES, export_state, save_hf
from polymodal.families.contrastive.convert import contrastive_rules

from randomise import randomise  # tests/parity/randomise.py

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=4)
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=12, pad_token_id=1, bos_token_id=0)
TOL = 1e-4


def hf_model(kind: str):
    if kind == "siglip":
        cfg = transformers.SiglipConfig(text_config={**TEXT, "eos_token_id": 98}, vision_config=VISION)
        model = transformers.SiglipModel(cfg)
    else:  # "clip": pools the first eos_token_id; "clip-legacy": eos_token_id 2 pools the highest id
        eos = 2 if kind == "clip-legacy" else 98
        cfg = transformers.CLIPConfig(text_config={**TEXT, "eos_token_id": eos}, vision_config=VISION,
                                      projection_dim=24)
        model = transformers.CLIPModel(cfg)
    randomise(model, "norm", mean=1.0)
    randomise(model, "bias")  # off HF's zero init, layer norms' too (logit_bias is set below)
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        if kind == "siglip":
            model.logit_bias.fill_(-1.5)
    return model


def batch(kind: str):
    """3 image/text pairs; texts end in <eos> then right padding, as the tokenizers write them."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 12), generator=g)
    lengths = [12, 7, 4]
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, n - 1] = 98
        ids[row, n:] = 1
        mask[row, :n] = 1
    if kind == "clip-legacy":
        ids[0, 3] = 98  # the highest id wins, not the first <eos>
    return ids, mask, torch.randn(3, 3, 16, 16, generator=g)


@pytest.fixture(scope="module", params=["siglip", "clip", "clip-legacy"])
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return hf.eval(), pm.from_pretrained(directory), request.param


@pytest.mark.parametrize("padded", [False, True])
def test_embeddings_logits_loss_and_gradients_match(pair, padded):
    hf, ours, kind = pair
    ids, mask, px = batch(kind)
    mask = mask if padded else None
    hf.zero_grad()
    ours.zero_grad()
    ref = hf(input_ids=ids, pixel_values=px, attention_mask=mask, return_loss=True)
    out = ours(ids, px, mask)
    for name in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        assert (getattr(out, name) - getattr(ref, name)).abs().max() <= TOL, name
    assert (out.loss - ref.loss).abs() <= TOL
    ref.loss.backward()
    out.loss.backward()
    grads = export_state(contrastive_rules(ours.config), {k: p.grad for k, p in ours.named_parameters()})
    ref_grads = {k: p.grad for k, p in hf.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    for key, grad in grads.items():
        assert (grad - ref_grads[key]).abs().max() <= TOL, key


def test_encoders_match_hf_features(pair):
    hf, ours, kind = pair
    ids, mask, px = batch(kind)
    with torch.no_grad():
        image = F.normalize(hf.get_image_features(pixel_values=px).pooler_output, dim=-1)
        text = F.normalize(hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
        assert (ours.encode_image(px) - image).abs().max() <= TOL
        assert (ours.encode_text(ids, mask) - text).abs().max() <= TOL


def test_round_trip_to_hf_is_identical(pair, tmp_path):
    hf, ours, kind = pair
    save_hf(ours, tmp_path / "back", "siglip" if kind == "siglip" else "clip")
    back = type(hf).from_pretrained(tmp_path / "back").eval()
    original = hf.state_dict()
    assert back.state_dict().keys() == original.keys()
    for key, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    assert back.config.text_config.eos_token_id == hf.config.text_config.eos_token_id
    ids, mask, px = batch(kind)
    with torch.no_grad():
        a = back(input_ids=ids, pixel_values=px, attention_mask=mask)
        b = hf(input_ids=ids, pixel_values=px, attention_mask=mask)
    assert torch.equal(a.logits_per_image, b.logits_per_image)


@pytest.mark.parametrize("preset,model_type", [("siglip-so400m-14-224", "siglip"), ("clip-vit-l-14", "clip")])
def test_real_shapes_survive_the_hf_config_round_trip(preset, model_type):
    cfg = pm.PRESETS[preset]()
    family = FAMILIES[model_type]
    hf_class = transformers.SiglipConfig if model_type == "siglip" else transformers.CLIPConfig
    hf = hf_class(**{k: v for k, v in family.config_to_hf(cfg).items() if k not in ("architectures", "model_type")})
    assert family.config_from_hf(hf.to_dict()) == cfg


def test_models_without_an_hf_equivalent_are_not_exported(tmp_path):
    with pytest.raises(ConfigError, match="pools at token 2 has no HF CLIP equivalent"):
        save_hf(pm.build("clip-tiny"), tmp_path / "a", "clip")  # polymodal's tokenizer ends texts with id 2
    with pytest.raises(ConfigError, match="HF clip needs clip towers, the softmax loss and projections"):
        save_hf(pm.build("siglip-tiny"), tmp_path / "b", "clip")
