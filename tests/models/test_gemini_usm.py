"""Gemini hearing through USM's Conformer (`audio_encoder="usm"`, the gemini-tiny-usm preset): the choice in the
config, the audio span and features the document format lays out, cached generation, input errors, save and load.
A few steps through `polymodal train`: tests/e2e/test_every_family_trains.py."""

import numpy as np
import pytest
import torch

import polymodal as pm
from polymodal.config import ConfigError
from polymodal.data.documents import Audio, Document, Segment
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.conformer import ConformerEncoder
from polymodal.encoders.usm_features import UsmFeatureExtractor
from polymodal.families import load_config
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.families.gemini.presets import gemini_tiny, gemini_tiny_usm

WORLD = World(seed=0)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(WORLD.texts(), vocab_size=512)


@pytest.fixture(scope="module")
def cfg(tok):
    return fit_to_tokenizer(gemini_tiny_usm(), tok)


@pytest.fixture(scope="module")
def collator(cfg, tok):
    return make_collator(cfg, tok)


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return pm.build(cfg).eval()


def audio_docs(split="train"):
    return [WORLD.sample(task, i, split).document for task in ("audio_count", "audio_pitch") for i in range(2)]


def test_the_config_chooses_the_encoder(model, cfg, tmp_path):
    assert isinstance(model.audio, ConformerEncoder) and model.audio_proj.in_features == cfg.usm.dim
    with pytest.raises(ConfigError, match=r"audio_encoder must be one of \['whisper', 'usm'\], got 'wav2vec'"):
        cfg.replace(audio_encoder="wav2vec")
    with pytest.raises(ConfigError, match="audio_encoder='usm' hears through usm, but audio is set too"):
        cfg.replace(audio=gemini_tiny().audio)
    with pytest.raises(ConfigError, match="audio_encoder='whisper' hears through audio, but usm is set too"):
        gemini_tiny().replace(usm=cfg.usm)
    with pytest.raises(ConfigError, match="usm encoder's 25 frames per clip must be divisible by audio_pool"):
        cfg.replace(audio_pool=2)
    path = tmp_path / "config.json"
    cfg.to_json(path)
    assert load_config(path) == cfg


def test_stream_layout_and_features(cfg, tok, collator):
    doc = audio_docs()[0]
    clip = doc.segments[0].media
    encoded = collator.encode(doc)
    ids = encoded.tokens["input_ids"]
    start, end = ids.index(tok.special_ids["<audio>"]), ids.index(tok.special_ids["</audio>"])
    assert end - start - 1 == cfg.tokens_per_clip == 25  # 97 frames of 10 ms, sub-sampled 4x
    expected, mask = UsmFeatureExtractor(n_mels=64)(clip.waveform, sampling_rate=clip.sample_rate)
    assert mask.all() and encoded.media["input_features"].shape == (1, 97, 64)
    assert torch.equal(encoded.media["input_features"], expected)


def test_a_short_clip_is_padded_with_silence_and_a_long_one_refused(cfg, collator):
    tone = lambda n: Audio(np.sin(2 * np.pi * 440 * np.arange(n) / 16000).astype(np.float32), 16000)  # noqa: E731
    short = collator([Document([Segment("audio", media=tone(8000)), Segment("text", "hi")])])["input_features"]
    whole = UsmFeatureExtractor(n_mels=64)(np.pad(tone(8000).waveform, (0, 8000)), sampling_rate=16000)[0]
    assert torch.equal(short, whole)
    with pytest.raises(ValueError, match=r"audio clip of 1\.5 s .* hears at most 1 s"):
        collator([Document([Segment("audio", media=tone(24000)), Segment("text", "hi")])])


def test_what_it_hears_changes_the_answer(model, collator):
    batch = collator(audio_docs()[:2])
    with torch.no_grad():
        a = model(**batch).logits
        b = model(**{**batch, "input_features": batch["input_features"].flip(0)}).logits
    assert (a - b).abs().amax(-1).amax(-1).min() > 1e-3  # both rows: the clips differ


def test_cached_generation_equals_uncached_forward(model, collator):
    docs = audio_docs("eval")
    got = pm.generate(model, **collator.prompts(docs), max_new_tokens=4)
    for row, doc in enumerate(docs):
        alone = collator.prompts([doc])
        ids, media, spans = alone["input_ids"], alone["input_features"], model.image_spans
        state = spans.start(ids)
        for _ in range(4):  # no cache: the whole sequence, the clip encoded again, every step
            with torch.no_grad():
                nxt = spans.mask(model(ids, input_features=media).logits[:, -1], state).argmax(-1, keepdim=True)
            state = spans.advance(state, nxt[:, 0])
            ids = torch.cat((ids, nxt), 1)
        assert got[row].tolist() == ids[0, -4:].tolist()


def test_features_of_another_window_are_an_error(model, collator):
    batch = collator(audio_docs()[:1])
    with pytest.raises(ValueError, match=r"input_features.*97.*64"):
        model(batch["input_ids"], input_features=batch["input_features"][:, :50])
    with pytest.raises(ValueError, match=r"input_features.*97.*64"):
        model(batch["input_ids"], input_features=batch["input_features"].transpose(1, 2))  # Whisper's layout


def test_save_and_load_give_the_same_logits(model, collator, tmp_path):
    """from_pretrained builds on the meta device: the USM window's frames are counted there too."""
    pm.save_pretrained(model, tmp_path / "run")
    loaded = pm.from_pretrained(tmp_path / "run").eval()
    batch = collator(audio_docs()[:2])
    assert isinstance(loaded.audio, ConformerEncoder)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
