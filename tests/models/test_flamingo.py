"""Flamingo: media-local masking, gates, freezing, cached decode, cross-attention K/V computed once."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import polymodal as pm
from polymodal.config import ConfigError, DecoderConfig
from polymodal.fusion.perceiver import PerceiverResampler
from polymodal.fusion.perceiver import PerceiverConfig
from polymodal.families.flamingo.model import Flamingo
from polymodal.families.flamingo.config import FlamingoConfig
from polymodal.nn.masks import media_attention_mask, media_ids
from polymodal.nn.transformer import Decoder

IMG = 5  # media token id
D_MEDIA, V = 24, 6  # width and count of precomputed image features


def tiny(**overrides) -> Flamingo:
    cfg = dict(text=DecoderConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                  max_seq_len=64),
               media_dim=D_MEDIA, perceiver=PerceiverConfig(depth=2, n_heads=2, head_dim=8, n_latents=3, max_media=4,
                                                            max_frames=2),
               cross_attn_every=2, media_token_id=IMG)
    model = Flamingo(FlamingoConfig(**{**cfg, **overrides}))
    with torch.no_grad():  # open the gates: a fresh model is the identity and would hide every bug
        for block in model.cross_layers:
            block.attn_gate.fill_(0.8)
            block.mlp_gate.fill_(-0.6)
    return model.eval()


def prompts():
    """Two rows, text before the first image; row 1 has 2 of the 3 media slots and left padding."""
    ids = torch.randint(6, 64, (2, 14))
    ids[0, [3, 7, 11]] = IMG
    ids[1, [6, 9]] = IMG
    am = torch.ones_like(ids)
    am[1, :2] = 0
    media_mask = torch.tensor([[True, True, True], [True, True, False]])
    return ids.masked_fill(am == 0, 0), am, media_mask


def feats(B=2, N=3):
    return torch.randn(B, N, V, D_MEDIA)


def test_media_mask_truth_table():
    locations = torch.tensor([[0, 1, 0, 0, 1, 0]]).bool()
    ids = media_ids(locations)
    assert ids.tolist() == [[0, 1, 1, 1, 2, 2]]
    mask, sees = media_attention_mask(ids, n_media=2, tokens_per_media=2)
    assert sees.tolist() == [[False, True, True, True, True, True]]
    assert mask[0, 0].int().tolist() == [
        [1, 1, 1, 1],  # before any media: sees nothing (row kept finite, output zeroed)
        [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0],
        [0, 0, 1, 1], [0, 0, 1, 1],
    ]


def test_media_ids_stop_at_document_boundaries():
    locations = torch.tensor([[1, 0, 0, 0, 1, 0]]).bool()
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert media_ids(locations, docs).tolist() == [[1, 1, 1, 0, 2, 2]]


torch.manual_seed(0)
BLOCK = tiny().cross_layers[0]  # built once: hypothesis runs the property test many times


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=4, unique=True), st.data())
def test_perturbing_media_i_changes_only_its_text_span(starts, data):
    """The cross-attention output of token t depends on media i iff i is the latest media started at or before t."""
    torch.manual_seed(0)
    block = BLOCK
    starts = sorted(starts)
    n = len(starts)
    locations = torch.zeros(1, 16, dtype=torch.bool)
    locations[0, starts] = True
    mask, sees = media_attention_mask(media_ids(locations), n, V)
    x, media = torch.randn(1, 16, 32), torch.randn(1, n, V, D_MEDIA)
    i = data.draw(st.integers(0, n - 1))
    bumped = media.clone()
    bumped[:, i] += torch.randn(V, D_MEDIA)
    with torch.no_grad():
        a = block(x, media.flatten(1, 2), mask=mask, sees_media=sees)
        b = block(x, bumped.flatten(1, 2), mask=mask, sees_media=sees)
    changed = (a - b).abs().amax(-1)[0] > 0
    end = starts[i + 1] if i + 1 < n else 16
    assert changed.tolist() == [starts[i] <= t < end for t in range(16)]


def test_model_logits_before_a_media_do_not_depend_on_it():
    model = tiny()
    ids, am, media_mask = prompts()
    f = feats()
    bumped = f.clone()
    bumped[:, 1] += 1.0  # the second media starts at token 7 (row 0) and 9 (row 1)
    with torch.no_grad():
        a = model(ids, attention_mask=am, image_encoder_embeddings=f, media_mask=media_mask).logits
        b = model(ids, attention_mask=am, image_encoder_embeddings=bumped, media_mask=media_mask).logits
    changed = ((a - b).abs().amax(-1) > 0) & am.bool()  # pads' outputs are never read
    assert changed.tolist() == [[t >= 7 for t in range(14)], [t >= 9 for t in range(14)]]


def test_text_before_any_media_gets_exactly_zero_cross_attention():
    model = tiny()
    block = model.cross_layers[0]
    with torch.no_grad():
        block.mlp_gate.zero_()
        locations = torch.zeros(1, 8, dtype=torch.bool)
        locations[0, 5] = True
        mask, sees = media_attention_mask(media_ids(locations), 1, V)
        x = torch.randn(1, 8, 32)
        y = block(x, torch.randn(1, V, D_MEDIA), mask=mask, sees_media=sees)
    assert torch.equal(y[:, :5], x[:, :5])
    assert not torch.equal(y[:, 5:], x[:, 5:])


def test_fresh_model_is_the_language_model_and_keeps_its_keys():
    cfg = FlamingoConfig(text=DecoderConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, hidden_dim=64),
                         media_dim=D_MEDIA, perceiver=PerceiverConfig(depth=1, n_heads=2, head_dim=8, n_latents=3),
                         cross_attn_every=2, media_token_id=IMG)
    lm = Decoder(cfg.text).eval()
    model = Flamingo(cfg).eval()
    model.decoder.load_state_dict(lm.state_dict())  # a decoder checkpoint loads unchanged
    assert {k.removeprefix("decoder.") for k in model.state_dict() if k.startswith("decoder.")} == set(lm.state_dict())
    ids, am, media_mask = prompts()
    with torch.no_grad():
        got = model(ids, attention_mask=am, image_encoder_embeddings=feats(), media_mask=media_mask).logits
        expected = lm(ids, attention_mask=am).logits
    assert torch.equal(got, expected)


def test_freeze_trains_only_perceiver_and_cross_attention():
    model = tiny().train()
    model.freeze()
    ids, am, media_mask = prompts()
    out = model(ids, attention_mask=am, image_encoder_embeddings=feats(), media_mask=media_mask,
                labels=ids.masked_fill(am == 0, -100))
    out.loss.backward()
    for name, p in model.named_parameters():
        trainable = name.startswith(("perceiver.", "cross_layers."))
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_cached_decode_equals_full_forward():
    model = tiny()
    ids, am, media_mask = prompts()
    f = feats()
    new = torch.randint(6, 64, (2, 5))
    full, full_am = torch.cat([ids, new], 1), torch.cat([am, torch.ones_like(new)], 1)
    with torch.no_grad():
        expected = model(full, attention_mask=full_am, image_encoder_embeddings=f, media_mask=media_mask).logits
        cache = model.make_cache(2, full.shape[1])
        steps = [model(ids, attention_mask=am, image_encoder_embeddings=f, media_mask=media_mask, cache=cache).logits]
        steps += [model(new[:, i:i + 1], cache=cache).logits for i in range(new.shape[1])]
    got = torch.cat(steps, 1)
    assert (got - expected)[full_am.bool()].abs().max() <= 1e-5


def test_generate_computes_media_and_cross_kv_once():
    model = tiny()
    ids, am, media_mask = prompts()
    calls = {"wkv": 0, "perceiver": 0}

    def count(key):
        def hook(*_):
            calls[key] += 1
        return hook

    for block in model.cross_layers:
        block.attn.wkv.register_forward_hook(count("wkv"))
    model.perceiver.register_forward_hook(count("perceiver"))
    out = pm.generate(model, ids, am, max_new_tokens=6, image_encoder_embeddings=feats(), media_mask=media_mask)
    assert out.shape == (2, 6)
    assert calls == {"wkv": len(model.cross_layers), "perceiver": 1}


def test_generated_media_token_does_not_start_a_media():
    """Like HF, tokens after the prompt keep attending to the prompt's last media, whatever they are."""
    model = tiny()
    ids, am, media_mask = prompts()
    f = feats()
    with torch.no_grad():
        cache = model.make_cache(2, ids.shape[1] + 1)
        model(ids, attention_mask=am, image_encoder_embeddings=f, media_mask=media_mask, cache=cache)
        step = model(torch.full((2, 1), IMG), cache=cache).logits[:, -1]
        # the same token in a full forward, with its media location cleared
        full = torch.cat([ids, torch.full((2, 1), IMG)], 1)
        locations = full == IMG
        locations[:, -1] = False
        expected = model(full, attention_mask=torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], 1),
                         image_encoder_embeddings=f, media_mask=media_mask, media_locations=locations).logits[:, -1]
    assert (step - expected).abs().max() <= 1e-5


def test_packed_documents_equal_alone():
    model = tiny(perceiver=PerceiverConfig(depth=1, n_heads=2, head_dim=8, n_latents=3))
    a, b = torch.randint(6, 64, (1, 6)), torch.randint(6, 64, (1, 7))
    a[0, 1], b[0, 0], b[0, 4] = IMG, IMG, IMG
    fa, fb = feats(1, 1), feats(1, 2)
    with torch.no_grad():
        alone = torch.cat([model(a, image_encoder_embeddings=fa).logits,
                           model(b, image_encoder_embeddings=fb).logits], 1)
        packed = model(torch.cat([a, b], 1), image_encoder_embeddings=torch.cat([fa, fb], 1),
                       document_ids=torch.tensor([[0] * 6 + [1] * 7])).logits
    assert (packed - alone).abs().max() <= 1e-5


def test_text_only_batch_runs_the_dense_branch():
    model = tiny()
    ids = torch.randint(6, 64, (2, 8))
    with torch.no_grad():
        out = model(ids).logits
        cache = model.make_cache(2, 9)
        model(ids, cache=cache)
        step = model(ids[:, :1], cache=cache).logits
    assert out.shape == (2, 8, 64) and step.shape == (2, 1, 64)


def test_perceiver_video_frames_and_time_embeddings():
    p = PerceiverResampler(16, depth=1, n_heads=2, head_dim=8, n_latents=4, hidden_dim=32, max_media=3, max_frames=2)
    video = torch.randn(2, 3, 2, 5, 16)  # (B, N, F, V, D)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = p(video, mask)
    assert out.shape == (2, 3, 4, 16)
    assert torch.equal(out[1, 1:], torch.zeros(2, 4, 16))
    swapped = p(video.flip(2), mask)  # frame embeddings make the order of frames matter
    assert not torch.allclose(out[0], swapped[0])
    with pytest.raises(ValueError, match="got 4 media per sample, but the perceiver has media-time embeddings for 3"):
        p(torch.randn(1, 4, 5, 16))
    with pytest.raises(ValueError, match="got 3 frames per media, but the perceiver has frame embeddings for 2"):
        p(torch.randn(1, 1, 3, 5, 16))
    images_only = PerceiverResampler(16, depth=1, n_heads=2, head_dim=8, n_latents=4, hidden_dim=32)
    assert images_only(torch.randn(1, 7, 5, 16)).shape == (1, 7, 4, 16)  # any number of media
    with pytest.raises(ValueError, match="it has none: images only"):
        images_only(torch.randn(1, 1, 2, 5, 16))


def test_clear_errors_before_compute():
    model = tiny()
    ids, am, media_mask = prompts()
    with pytest.raises(ValueError, match=r"marked \[3, 2\], given \[3, 3\]"):
        model(ids, attention_mask=am, image_encoder_embeddings=feats())
    with pytest.raises(ValueError, match="got 5 media per sample"):
        model(torch.full((2, 5), IMG), image_encoder_embeddings=feats(N=5))
    with pytest.raises(ValueError, match="exactly one of"):
        model(ids, image_encoder_embeddings=feats(), perceiver_embeddings=torch.randn(2, 3, 3, D_MEDIA))
    with pytest.raises(ValueError, match="no vision encoder"):
        model(ids, pixel_values=torch.randn(2, 3, 3, 8, 8), media_mask=media_mask)
    with pytest.raises(ValueError, match="media_mask must list each row's media first"):
        model(ids, image_encoder_embeddings=feats(), media_mask=torch.tensor([[True, True, True], [False, True, True]]))
    cache = model.make_cache(2, 20)
    model(ids, attention_mask=am, image_encoder_embeddings=feats(), media_mask=media_mask, cache=cache)
    with pytest.raises(ValueError, match="media are encoded once"):
        model(ids[:, :1], image_encoder_embeddings=feats(), cache=cache)
    with pytest.raises(ConfigError, match="give media_dim"):
        FlamingoConfig(text=DecoderConfig())


def test_overfits_one_batch_and_round_trips(tmp_path):
    model = tiny().train()
    model.freeze()
    ids, am, media_mask = prompts()
    f = feats()
    labels = ids.masked_fill(am == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, attention_mask=am, image_encoder_embeddings=f, media_mask=media_mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    pm.save_pretrained(model.eval(), tmp_path / "m")
    back = pm.from_pretrained(tmp_path / "m")
    assert back.config == model.config
    with torch.no_grad():
        assert torch.equal(back(ids, attention_mask=am, image_encoder_embeddings=f, media_mask=media_mask).logits,
                           model(ids, attention_mask=am, image_encoder_embeddings=f, media_mask=media_mask).logits)


def test_flamingo_tiny_preset_reads_images_and_videos():
    model = pm.build("flamingo-tiny").eval()
    ids = torch.randint(12, 512, (2, 10))
    ids[:, 1] = ids[0, 6] = model.config.media_token_id
    media_mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        images = model(ids, pixel_values=torch.randn(2, 2, 3, 32, 32), media_mask=media_mask).logits
        videos = model(ids, pixel_values=torch.randn(2, 2, 4, 3, 32, 32), media_mask=media_mask).logits
    assert images.shape == videos.shape == (2, 10, 512)
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, N, 3, 32, 32\)"):
        model(ids, pixel_values=torch.randn(2, 2, 3, 16, 16), media_mask=media_mask)
