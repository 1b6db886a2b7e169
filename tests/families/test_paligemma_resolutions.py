"""PaliGemma at 448 and 896: the presets' image token counts, and a model resized from its training size
(`resize_images`) that trains, saves and loads at the new size. Parity with HF's interpolation is in
tests/parity/test_vision_interpolation_parity.py."""

import pytest
import torch

import polymodal as pm
from polymodal.presets import get_preset


@pytest.mark.parametrize("preset, size, tokens", [("paligemma-3b", 224, 256), ("paligemma-3b-448", 448, 1024),
                                                  ("paligemma-3b-896", 896, 4096)])
def test_presets_read_their_size_in_patches_of_14(preset, size, tokens):
    cfg = get_preset(preset)
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.tokens_per_image) == (size, 14, tokens)
    with torch.device("meta"):
        model = pm.build(cfg)
    assert model.vision.pos_embed.weight.shape == (tokens, 1152)


def test_a_resized_model_trains_saves_and_loads_at_its_new_size(tmp_path):
    torch.manual_seed(0)
    model = pm.build("paligemma-tiny")  # 32x32 in patches of 8: 16 tokens
    model.trainable(["decoder"])
    before = model.vision.pos_embed.weight.detach().clone()
    model.resize_images(64)
    weight = model.vision.pos_embed.weight
    assert weight.shape == (64, 96) and not weight.requires_grad  # frozen as before
    corners = weight.detach().reshape(8, 8, 96)[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert not torch.equal(corners, before.reshape(4, 4, 96)[[0, 0, -1, -1], [0, -1, 0, -1]])  # bicubic moves them
    cfg = model.config
    ids = torch.tensor([[cfg.image_token_id] * 64 + [3, 4, 5, 6]])
    types = torch.tensor([[0] * 66 + [1, 1]])
    px = torch.randn(1, 3, 64, 64)
    out = model(ids, px, token_type_ids=types, labels=ids.masked_fill(types == 0, -100))
    out.loss.backward()
    assert model.decoder.tok_embeddings.weight.grad is not None and weight.grad is None
    pm.save_pretrained(model.eval(), tmp_path / "m")
    loaded = pm.from_pretrained(tmp_path / "m")
    assert loaded.config == cfg and loaded.config.tokens_per_image == 64
    with torch.no_grad():
        assert torch.equal(loaded(ids, px, token_type_ids=types).logits, model(ids, px, token_type_ids=types).logits)
    with pytest.raises(ValueError, match="image_size \\(63\\) must be divisible by patch_size \\(8\\)"):
        model.resize_images(63)


def test_a_collator_at_another_size_feeds_run_time_interpolation(tmp_path):
    """`config.at_image_size(64)` lays a 32x32-trained model's prompts out at 64x64 (64 placeholders, 64x64
    pixels); the model reads them with interpolate_pos_encoding=True exactly as a copy resized for good does."""
    from PIL import Image

    from polymodal.data.documents import Document, Segment
    from polymodal.data.tokenizer import Tokenizer
    from polymodal.families.collators import make_collator
    from polymodal.families.paligemma.format import PaliGemmaFormat

    torch.manual_seed(0)
    tok = Tokenizer.train(["where is the red box"] * 10, vocab_size=280)
    model = pm.build(PaliGemmaFormat.fit(get_preset("paligemma-tiny"), tok)).eval()
    image = Image.effect_noise((50, 40), 60).convert("RGB")
    doc = Document([Segment("image", media=image), Segment("text", text="where is the red box")])
    batch = make_collator(model.config.at_image_size(64), tok).prompts([doc, doc])
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 2 * 64
    with torch.no_grad():
        got = model(**batch, interpolate_pos_encoding=True).logits
        resized = pm.build(model.config).eval()
        resized.load_state_dict(model.state_dict())
        want = resized.resize_images(64)(**batch).logits
    assert torch.equal(got, want) and model.config.vision.image_size == 32
    with pytest.raises(TypeError, match="interpolate_pos_encoding must be true or false, got 'yes'"):
        model(**batch, interpolate_pos_encoding="yes")
