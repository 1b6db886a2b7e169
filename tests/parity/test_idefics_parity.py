"""Idefics (HF's Flamingo): HF checkpoint dir -> pm.from_pretrained -> same logits and greedy tokens as HF,
with several images per sample, text before the first image, a padded image slot and left padding."""

import pytest
import torch

import polymodal as pm
from polymodal.config import ConfigError
from polymodal.convert.hf import save_hf
from polymodal.families.flamingo.convert import config_from_hf

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")

IMG = 60  # the <image> token of these prompts (any id: media positions are passed explicitly)
VISION = dict(embed_dim=24, image_size=16, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=40)
CONFIGS = {
    # idefics-80b's options: perceiver with qk LayerNorms, qk RMSNorms in the cross-attention, extra vocab
    "resampler-qknorm-vector-gates": dict(
        num_hidden_layers=4, cross_layer_interval=2, qk_layer_norms=True, alpha_type="vector", additional_vocab_size=2,
        use_resampler=True, perceiver_config=dict(resampler_n_latents=3, resampler_depth=2, resampler_n_heads=2,
                                                  resampler_head_dim=8, qk_layer_norms_perceiver=True)),
    # text cross-attends to the raw CLIP features (class token included); tied embeddings
    "no-resampler-float-gates-tied": dict(num_hidden_layers=2, cross_layer_interval=1, tie_word_embeddings=True),
}


def hf_model(overrides: dict):
    cfg = transformers.IdeficsConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                     max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     vision_config=VISION, **overrides)
    model = transformers.IdeficsForVisionText2Text(cfg)
    with torch.no_grad():  # open the gates (HF starts them at 0: identity); weights big enough for images to matter
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.uniform_(0.3, 1.0)
            elif "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.3)
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def batch():
    """Row 0: 3 images, the first after 2 text tokens; row 1: 2 images (third slot padding), left-padded."""
    ids = torch.randint(3, 60, (2, 14))
    ids[0, [2, 6, 10]] = IMG
    ids[1, [5, 9]] = IMG
    am = torch.ones_like(ids)
    am[1, :3] = 0
    ids = ids.masked_fill(am == 0, 0)
    locations = ids == IMG
    image_attention_mask = torch.nn.functional.one_hot(locations.long().cumsum(-1), 4)[..., 1:]  # HF's (B, S, N)
    pixels = torch.randn(2, 3, 3, 16, 16)
    pixels[1, 2] = 0.0
    media_mask = torch.tensor([[True, True, True], [True, True, False]])
    return ids, am, locations, image_attention_mask, pixels, media_mask


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = hf_model(dict(CONFIGS[request.param]))
    directory = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(directory)
    return hf, pm.from_pretrained(directory)


def test_logits_match_hf(pair):
    hf, ours = pair
    ids, am, locations, iam, pixels, media_mask = batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=am, pixel_values=pixels, image_attention_mask=iam).logits
        for marks in (dict(media_locations=locations), dict(image_attention_mask=iam)):  # ours, or HF's argument
            got = ours(ids, attention_mask=am, pixel_values=pixels, media_mask=media_mask, **marks).logits
            diff = (got - expected)[am.bool()].abs().max()
            assert diff <= 1e-4, (diff, list(marks))
    # the images matter (the test would be vacuous with closed gates)
    with torch.no_grad():
        other = ours(ids, attention_mask=am, pixel_values=pixels.flip(1), media_locations=locations,
                     media_mask=media_mask).logits
    assert (other - got)[0, 2:].abs().max() > 1e-3


def test_greedy_generation_matches_hf(pair):
    hf, ours = pair
    ids, am, locations, iam, pixels, media_mask = batch()
    expected = hf.generate(input_ids=ids, attention_mask=am, pixel_values=pixels, image_attention_mask=iam,
                           max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0)[:, ids.shape[1]:]
    for marks in (dict(media_locations=locations), dict(image_attention_mask=iam)):
        got = pm.generate(ours, ids, am, max_new_tokens=10, eos_token_id=2, pad_token_id=0, pixel_values=pixels,
                          media_mask=media_mask, **marks)
        assert got[:, :expected.shape[1]].tolist() == expected.tolist(), list(marks)


def test_an_image_attention_mask_flamingo_cannot_follow_is_an_error(pair):
    """HF's image_attention_mask (accepted above) may let a token see several images; Flamingo's rule cannot."""
    hf, ours = pair
    ids, am, _, iam, pixels, media_mask = batch()
    two = iam.clone()
    two[0, -1] = 1  # the last token of row 0 sees all three images
    with pytest.raises(pm.InputError, match="lets token 13 of row 0 see 3 media; Flamingo lets each token see at most one"):
        ours(ids, attention_mask=am, pixel_values=pixels, image_attention_mask=two)
    with pytest.raises(pm.InputError, match=r"image_attention_mask must be \(batch, seq, n_media\) = \(2, 14, 3\)"):
        ours(ids, attention_mask=am, pixel_values=pixels, image_attention_mask=iam[..., :2])


def test_image_token_comes_from_the_directory_tokenizer(pair, tmp_path):
    """HF keeps Idefics' <image> id in the tokenizer: with a tokenizer.json beside the weights, generate finds
    the images from input_ids alone; without one, media_token_id stays unset."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    hf, ours = pair
    assert ours.config.media_token_id is None
    hf.save_pretrained(tmp_path)
    vocab = {f"w{i}": i for i in range(IMG)} | {"<image>": IMG}
    HFTokenizer(WordLevel(vocab, unk_token="w0")).save(str(tmp_path / "tokenizer.json"))
    with_tokenizer = pm.from_pretrained(tmp_path)
    assert with_tokenizer.config.media_token_id == IMG
    ids, am, locations, _, pixels, media_mask = batch()
    kwargs = dict(max_new_tokens=6, eos_token_id=2, pad_token_id=0, pixel_values=pixels, media_mask=media_mask)
    assert torch.equal(pm.generate(with_tokenizer, ids, am, **kwargs),
                       pm.generate(ours, ids, am, media_locations=locations, **kwargs))


def test_round_trip_to_hf_gives_identical_logits(pair, tmp_path):
    hf, ours = pair
    save_hf(ours, tmp_path / "back", "idefics")
    back = transformers.IdeficsForVisionText2Text.from_pretrained(tmp_path / "back").eval()
    ids, am, _, iam, pixels, _ = batch()
    with torch.no_grad():
        kwargs = dict(input_ids=ids, attention_mask=am, pixel_values=pixels, image_attention_mask=iam)
        assert torch.equal(back(**kwargs).logits, hf(**kwargs).logits)


def test_idefics_9b_preset_is_the_converted_hf_config():
    hf = transformers.IdeficsConfig(
        additional_vocab_size=2, cross_layer_interval=4, use_resampler=True,
        vision_config=dict(embed_dim=1280, image_size=224, intermediate_size=5120, patch_size=14, num_hidden_layers=32,
                           num_attention_heads=16),
        perceiver_config=dict(resampler_depth=6, resampler_n_heads=16, resampler_head_dim=96, resampler_n_latents=64))
    assert config_from_hf(hf.to_dict()) == pm.PRESETS["idefics-9b"]()


def test_unsupported_idefics_options_are_clear_errors():
    with pytest.raises(ConfigError, match="hidden_act 'gelu' is not supported"):
        config_from_hf({"hidden_act": "gelu"})
    with pytest.raises(ConfigError, match=r"cross_layer_interval \(3\) must divide num_hidden_layers \(4\)"):
        config_from_hf({"num_hidden_layers": 4, "cross_layer_interval": 3})
    with pytest.raises(ConfigError, match="alpha_type 'matrix'"):
        config_from_hf({"alpha_type": "matrix"})
