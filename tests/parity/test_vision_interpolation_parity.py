"""Images larger than the weights were trained at (PaliGemma 448/896 from 224): our ViT with interpolated
position embeddings, at run time or resized on loading, against HF's `interpolate_pos_encoding=True`
(SigLIP, CLIP, and a whole PaliGemma)."""

import pytest
import torch

import polymodal as pm
from polymodal.encoders.vit import ViT, interpolate_positions, resize_position_embeddings

from randomise import randomise  # tests/parity/randomise.py

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
            patch_size=4)  # trained at 16x16: a 4x4 grid of positions


@pytest.fixture(scope="module", params=["siglip", "clip"])
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    if request.param == "siglip":
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY))
    else:
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY))
    randomise(hf, "norm", mean=1.0)
    randomise(hf, "bias", "position_embedding")  # positions far from smooth: interpolation errors show
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return hf.eval(), pm.from_pretrained(d)


def assert_matches(ours, ref, px, **flags):
    pooled = ref.pooler_output is not None
    with torch.no_grad():
        out = ours(px, pooled=pooled, **flags)
    assert (out.features - ref.last_hidden_state).abs().max() <= 1e-4
    assert (out.pooled - ref.pooler_output).abs().max() <= 1e-4


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40), (16, 16), (8, 8)])
def test_run_time_interpolation_matches(pair, height, width):
    hf, ours = pair
    px = torch.randn(2, 3, height, width)
    with torch.no_grad():
        ref = hf(pixel_values=px, interpolate_pos_encoding=True)
    assert_matches(ours, ref, px, interpolate_pos_encoding=True)


def test_weights_resized_on_loading_match(pair):
    """A ViT configured at 32x32 loads the 16x16 weights with its positions interpolated once."""
    hf, ours = pair
    config = ours.config.replace(image_size=32)
    with pytest.raises(RuntimeError, match="pos_embed.weight"):  # unresized, the shapes cannot load
        ViT(config).load_state_dict(ours.state_dict())
    big = ViT(config).eval()
    big.load_state_dict(resize_position_embeddings(ours.state_dict(), config))
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=px, interpolate_pos_encoding=True)
    assert_matches(big, ref, px)  # no flag: 32x32 is its own size now
    with pytest.raises(ValueError, match=r"pixel_values must be \(num_images, 3, 32, 32\), got \(2, 3, 16, 16\)"):
        big(torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_positions_are_interpolated_in_the_weights_dtype(pair, dtype):
    hf, ours = pair
    embeddings = hf.embeddings.to(dtype)
    try:
        grid = (6, 10)
        n = 6 * 10 + (ours.class_token is not None)
        ref = embeddings.interpolate_pos_encoding(torch.zeros(1, n, 32, dtype=dtype), 24, 40)[0]
        got = interpolate_positions(ours.pos_embed.weight.to(dtype), grid, ours.class_token is not None)
    finally:
        embeddings.float()
    assert got.dtype == dtype and torch.equal(got, ref)


def test_sizes_that_are_no_multiple_of_the_patch_are_a_clear_error(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"multiples of the patch size \(4\) .* got 30x32"):
        ours(torch.randn(1, 3, 30, 32), interpolate_pos_encoding=True)


@pytest.fixture(scope="module")
def paligemma(tmp_path_factory):
    """An HF PaliGemma trained at 16x16 (a 4x4 grid of positions) saved to a directory, with 64 image tokens
    of input at 32x32: HF's model, its directory, (input_ids, token_type_ids, pixel_values) and HF's logits
    with its vision tower interpolating."""
    torch.manual_seed(0)
    image_token = 99
    cfg = transformers.PaliGemmaConfig(
        vision_config=TINY, image_token_index=image_token, projection_dim=32,
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=2,
                         eos_token_id=1))
    hf = transformers.PaliGemmaForConditionalGeneration(cfg)
    randomise(hf, "norm", "bias", "position_embedding")
    directory = tmp_path_factory.mktemp("paligemma")
    hf.eval().save_pretrained(directory)
    n_image = 64  # at 32x32
    ids = torch.tensor([[image_token] * n_image + [2, 5, 17, 33, 8, 41]] * 2)
    types = torch.tensor([[0] * (n_image + 4) + [1, 1]] * 2)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # transformers 5's PaliGemma forward does not pass interpolate_pos_encoding on to its vision tower;
        # its get_image_features does, and forward takes what it returns
        image = hf.model.get_image_features(px, interpolate_pos_encoding=True)
        ref = hf(input_ids=ids, token_type_ids=types, mm_encoder_outputs={"image": image}).logits
    return directory, (ids, types, px), ref


def test_paligemma_at_twice_its_size_matches_hf_interpolating(paligemma):
    """HF's PaliGemmaForConditionalGeneration with its vision tower interpolating against our PaliGemma built
    at the larger size from the same weights, positions resized on loading."""
    directory, (ids, types, px), ref = paligemma
    small = pm.from_pretrained(directory)
    config = small.config.replace(vision=small.config.vision.replace(image_size=32))
    big = pm.build(config).eval()
    big.load_state_dict(resize_position_embeddings(small.state_dict(), config.vision, prefix="vision."))
    assert config.tokens_per_image == 64
    with torch.no_grad():
        got = big(ids, px, token_type_ids=types).logits
    assert (got - ref).abs().max() <= 1e-4


def test_paligemma_resized_by_the_user_s_path_matches_hf_interpolating(paligemma):
    """`pm.from_pretrained(dir).resize_images(size)`: what a user types to read 448 images with 224 weights."""
    directory, (ids, types, px), ref = paligemma
    model = pm.from_pretrained(directory)
    with pytest.raises(ValueError, match=r"pixel_values must be \(num_images, 3, 16, 16\), got \(2, 3, 32, 32\)"):
        model(ids, px, token_type_ids=types)
    assert model.resize_images(32) is model
    assert (model.config.vision.image_size, model.config.tokens_per_image) == (32, 64)
    with torch.no_grad():
        got = model(ids, px, token_type_ids=types).logits
    assert (got - ref).abs().max() <= 1e-4
    with pytest.raises(ValueError, match=r"each image needs exactly 64 placeholder tokens"):
        model(ids[:, 48:], px, token_type_ids=types[:, 48:])


def test_paligemma_at_its_own_size_interpolates_per_call_like_hf(paligemma):
    """A PaliGemma built at 16x16 answers 32x32 images with interpolate_pos_encoding=True (forward and
    `pm.generate`), as HF's does with its vision tower interpolating: logits within 1e-4, greedy tokens equal."""
    directory, (ids, types, px), ref = paligemma
    model = pm.from_pretrained(directory).eval()
    with torch.no_grad():
        got = model(ids, px, token_type_ids=types, interpolate_pos_encoding=True).logits
    assert (got - ref).abs().max() <= 1e-4
    assert model.config.vision.image_size == 16  # nothing resized for good
    with pytest.raises(ValueError, match=r"pixel_values must be \(num_images, 3, 16, 16\), got \(2, 3, 32, 32\)"):
        model(ids, px, token_type_ids=types)
    with pytest.raises(ValueError, match=r"hold 128 image placeholder tokens but pixel_values gives 64 image embeddings"):
        model(ids, px[:, :, :16], token_type_ids=types, interpolate_pos_encoding=True)  # 16x32: 32 tokens each
    hf = transformers.PaliGemmaForConditionalGeneration.from_pretrained(directory).eval()
    prompt = ids[:, :-2]
    with torch.no_grad():
        image = hf.model.get_image_features(px, interpolate_pos_encoding=True)
        theirs = hf.generate(input_ids=prompt, token_type_ids=torch.zeros_like(prompt), mm_encoder_outputs={"image": image},
                             max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[:, prompt.shape[1]:]
    ours = pm.generate(model, prompt, pixel_values=px, token_type_ids=torch.zeros_like(prompt), max_new_tokens=6,
                       interpolate_pos_encoding=True)
    assert torch.equal(ours, theirs)
