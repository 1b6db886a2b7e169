"""ImageProcessor vs HF's SigLIP/CLIP/Idefics processors, AudioFeatureExtractor vs WhisperFeatureExtractor."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from polymodal.data.processors import CLIP_MEAN, CLIP_STD, ImageProcessor
from polymodal.encoders.mel import AudioFeatureExtractor


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is the reference for processor parity")


def _images() -> list[PIL.Image.Image]:
    """Noise and gradients of odd sizes, smaller, larger and not the shape of the targets, plus RGBA and L."""
    rng = np.random.default_rng(0)
    images = []
    for w, h in [(37, 53), (300, 211), (224, 224), (17, 9), (641, 479)]:
        images.append(PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0, 1, h)[:, None, None] * np.array([1.0, 0.5, 0.2])
        images.append(PIL.Image.fromarray(ramp.astype(np.uint8)))
    images.append(PIL.Image.fromarray(rng.integers(0, 256, (40, 60, 4), dtype=np.uint8), "RGBA"))
    images.append(PIL.Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8), "L"))
    return images


HF_CONFIGS = {
    "paligemma": {
        "image_processor_type": "SiglipImageProcessor", "processor_class": "PaliGemmaProcessor",
        "size": {"height": 64, "width": 48}, "do_resize": True, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "image_seq_length": 16,
    },
    "siglip-bilinear-defaults": {"image_processor_type": "SiglipImageProcessor", "resample": 2},
    "clip": {
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 56},
        "crop_size": {"height": 56, "width": 40}, "do_center_crop": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    },
    "clip-legacy-int-sizes": {  # as in openai/clip-vit-large-patch14
        "feature_extractor_type": "CLIPFeatureExtractor", "do_resize": True, "do_normalize": True,
        "size": 224, "crop_size": 224, "do_center_crop": True, "resample": 3,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    },
    "clip-crop-larger-than-resize": {
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 30},
        "crop_size": {"height": 41, "width": 33},
    },
    "idefics": {"image_processor_type": "IdeficsImageProcessor", "image_size": 40},
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_image_processor_matches_hf(name, tmp_path):
    transformers = _transformers()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(HF_CONFIGS[name]))
    # The PIL backend: HF's default when torchvision is missing, and the one its processors were built on.
    ref = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    ours = ImageProcessor.from_dir(tmp_path)
    images = _images()
    for image in images:
        expected = ref(image, return_tensors="pt")
        expected = getattr(expected, "pixel_values", expected)  # Idefics returns the tensor itself
        torch.testing.assert_close(ours(image), expected, atol=0, rtol=0)  # bit-exact, as the README says
    batch = ours([im for im in images if im.mode == "RGB"][:4])
    assert batch.dtype == torch.float32 and batch.shape[:2] == (4, 3)


def test_image_processor_defaults_and_batch_shape():
    px = ImageProcessor(size=(32, 24))([PIL.Image.new("RGB", (50, 70), (255, 0, 128))] * 3)
    assert px.shape == (3, 3, 32, 24)
    torch.testing.assert_close(px[:, 0], torch.ones(3, 32, 24))
    torch.testing.assert_close(px[:, 1], -torch.ones(3, 32, 24))


def test_image_processor_errors(tmp_path):
    with pytest.raises(ValueError, match="LlavaNextImageProcessor.*SiglipImageProcessor"):
        ImageProcessor.from_hf_dict({"image_processor_type": "LlavaNextImageProcessor"})
    with pytest.raises(ValueError, match="resample"):
        ImageProcessor.from_hf_dict({"image_processor_type": "SiglipImageProcessor", "resample": 1})
    with pytest.raises(ValueError, match="resample"):
        ImageProcessor(resample="nearest")
    with pytest.raises(ValueError, match="crop_size"):
        ImageProcessor(size=224)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_dir(tmp_path)
    proc = ImageProcessor(size=(8, 8))
    with pytest.raises(ValueError, match="empty"):
        proc([])
    with pytest.raises(TypeError, match=r"images\[1\].*ndarray"):
        proc([PIL.Image.new("RGB", (4, 4)), np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match="mode 'L'"):
        ImageProcessor(size=(8, 8), do_convert_rgb=False)(PIL.Image.new("L", (4, 4)))


def _waveforms(n_samples: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(3 * 16000) / 16000
    return [
        (0.1 * rng.standard_normal(12345)).astype(np.float32),
        (0.5 * np.sin(2 * np.pi * 440 * t) * np.linspace(0, 1, t.size)).astype(np.float32),
        rng.uniform(-1, 1, n_samples + 4321).astype(np.float32),  # truncated to the chunk
        np.zeros(100, np.float32),
    ]


@pytest.mark.parametrize("n_mels,chunk_length,n_fft,hop_length", [(80, 30, 400, 160), (40, 2, 400, 160), (16, 1, 64, 32)])
def test_audio_matches_whisper(n_mels, chunk_length, n_fft, hop_length):
    transformers = _transformers()
    ref = transformers.WhisperFeatureExtractor(
        feature_size=n_mels, chunk_length=chunk_length, n_fft=n_fft, hop_length=hop_length
    )
    ours = AudioFeatureExtractor(n_mels=n_mels, chunk_length=chunk_length, n_fft=n_fft, hop_length=hop_length)
    waves = _waveforms(ours.n_samples)
    for wave in waves:
        expected = torch.from_numpy(ref(wave, sampling_rate=16000, return_tensors="np").input_features[0])
        got = ours(wave, sampling_rate=16000)
        assert got.shape == (n_mels, ours.n_frames)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    expected = torch.from_numpy(ref(waves, sampling_rate=16000, return_tensors="np").input_features)
    torch.testing.assert_close(ours(waves, sampling_rate=16000), expected, atol=0, rtol=0)


def test_audio_errors():
    fe = AudioFeatureExtractor(n_mels=16, chunk_length=1)
    wave = np.zeros(1600, np.float32)
    with pytest.raises(ValueError, match="16000 Hz, got 44100 Hz"):
        fe(wave, sampling_rate=44100)
    with pytest.raises(ValueError, match="int16"):
        fe(np.zeros(1600, np.int16), sampling_rate=16000)
    with pytest.raises(ValueError, match="1-D"):
        fe(np.zeros((2, 1600), np.float32), sampling_rate=16000)
    with pytest.raises(ValueError, match="empty"):
        AudioFeatureExtractor(n_mels=64, n_fft=32)
