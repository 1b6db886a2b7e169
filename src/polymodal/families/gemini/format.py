"""Gemini's document format: documents -> its one interleaved stream; and where a model that writes images
keeps its VQ codes in the vocabulary (`place_codes`, read by the presets and by `fit` alike)."""

from __future__ import annotations

import math

import numpy as np
import torch

from polymodal.data.formats import SEPARATOR, Encoded, _labels, _name, _prompt, fit_text
from polymodal.data.media import check_waveform, resample
from polymodal.data.processors import ImageProcessor, images_to_pixels
from polymodal.encoders.mel import AudioFeatureExtractor
from polymodal.errors import DocumentError


def place_codes(config, vq, text_tokens: int, *, text=None, tokens=None):
    """The Gemini config with image output: `vq`, then the begin and end tokens of a written image and the VQ
    codes right after the first `text_tokens` ids (a tokenizer's vocabulary), the vocabulary grown to hold
    them; `text` / `tokens`: the config's own unless given."""
    text, tokens = text or config.text, tokens or config.tokens
    return config.replace(vq=vq, text=text.replace(vocab_size=text_tokens + 2 + vq.num_embeddings),
                          tokens=tokens.replace(draw=(text_tokens, text_tokens + 1)), image_codes=text_tokens + 2)


class GeminiFormat:
    """Documents -> the Gemini stream: <bos>, then the segments in document order, each text segment
    ended by "\\n" (the last by <eos>) and each media a span `<img> P*n </img>` (`<audio>`, `<video>`);
    labels on target text and, for a model with image output (vq), on target images: `tokens.draw` spans
    whose placeholders the model fills with the image's VQ codes (`fusion/writer.py`). Images (and video
    frames) are resized to image_size and scaled to [-1, 1]; audio at any sample rate is resampled to
    the encoder's and becomes the log-mel of the encoder the config chooses (Whisper's (n_mels, T), or USM's
    (T, n_mels), each padded with silence to its window); it must fit the encoder's window (a longer clip is an
    error, never cut silently)."""

    def __init__(self, config, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.sep = tokenizer.encode(SEPARATOR)
        self.max_len = config.text.max_seq_len
        self.images = ImageProcessor(size=(config.image_size, config.image_size), resample="bicubic")
        a = config.audio
        self.audio = (AudioFeatureExtractor(a.n_mels, a.sampling_rate, a.hop_length, a.n_fft,
                                            a.chunk_samples // a.sampling_rate) if a is not None else None)
        if config.usm is not None:
            self.audio = config.usm_features()
        self.window = (self.audio.max_samples if config.usm is not None
                       else self.audio.n_samples if self.audio is not None else 0)  # samples a clip may hold

    @staticmethod
    def fit(config, tokenizer):
        ids = tokenizer.special_ids
        tokens = type(config.tokens)(placeholder=ids["<image>"], image=(ids["<img>"], ids["</img>"]),
                                     audio=(ids["<audio>"], ids["</audio>"]), video=(ids["<video>"], ids["</video>"]))
        text = fit_text(config.text, tokenizer)
        if config.vq is None:
            return config.replace(text=text, tokens=tokens)
        return place_codes(config, config.vq, tokenizer.vocab_size, text=text, tokens=tokens)

    def encode(self, doc, prompt_only: bool = False):
        segments = list(zip(doc.segments, doc.target_mask))
        if prompt_only:
            segments = [(s, False) for s in _prompt(doc)]
        cfg, tok, pieces = self.config, self.tokenizer, [([self.tokenizer.bos_id], False)]
        media: dict[str, list[torch.Tensor]] = {}
        for i, (seg, target) in enumerate(segments):
            if seg.kind == "text":
                last = i == len(segments) - 1 and not prompt_only
                text = tok.encode(seg.text, split_special_tokens=True)  # never a control token
                pieces += [(text, target), ([tok.eos_id] if last else self.sep, target)]
                continue
            if target:
                pieces += self._drawn(seg, _name(doc), last=i == len(segments) - 1)
                media.setdefault("target_pixel_values", []).append(images_to_pixels([seg.media], cfg.vq.resolution))
                continue
            key, tensor, n = self._media(seg, _name(doc))
            start, end = getattr(self.config.tokens, seg.kind)
            pieces.append(([start] + [self.config.tokens.placeholder] * n + [end], False))
            media.setdefault(key, []).append(tensor)
        tokens = {"input_ids": [i for p, _ in pieces for i in p], "labels": _labels(pieces)}
        return Encoded(tokens, {k: torch.cat(v) for k, v in media.items()})

    def _drawn(self, seg, name: str, last: bool) -> list[tuple[list[int], bool]]:
        """A target image: `begin`, a placeholder per code (`Gemini.writer` puts the codes in), `end`."""
        cfg = self.config
        if seg.kind != "image" or cfg.vq is None:
            raise DocumentError(f"{name} has a {seg.kind} target; this model reads media and writes text"
                             + (" and images" if cfg.vq is not None else ""))
        begin, end = cfg.tokens.draw
        span = [begin] + [cfg.tokens.placeholder] * cfg.vq.tokens_per_image + [end]
        return [(span, True)] + ([([self.tokenizer.eos_id], True)] if last else [])

    def _media(self, seg, name: str) -> tuple[str, torch.Tensor, int]:
        cfg = self.config
        if seg.kind == "image":
            return "pixel_values", self.images([seg.media]), cfg.tokens_per_image
        if seg.kind == "audio":
            if self.audio is None:
                raise DocumentError(f"{name} has an audio segment but this model has no audio encoder")
            return "input_features", self._audio(seg.media, name)[None], cfg.tokens_per_clip
        frames = list(seg.media or [])
        if not frames:
            raise DocumentError(f"{name} has a video with no frames; a video needs at least one frame")
        if len(frames) > cfg.max_frames:
            raise DocumentError(f"{name} has a video of {len(frames)} frames; this model embeds at most "
                             f"max_frames={cfg.max_frames}")
        return "pixel_values_videos", self.images(frames)[None], len(frames) * cfg.tokens_per_image

    def _audio(self, clip, name: str) -> torch.Tensor:
        """A clip at any sample rate -> log-mel at the encoder's rate. Its length is counted in seconds before
        resampling, so a clip past the window is refused for that, whatever its rate, never cut silently."""
        check_waveform(clip.waveform, clip.sample_rate)
        rate, seconds = self.audio.sampling_rate, len(clip.waveform) / clip.sample_rate
        if math.ceil(len(clip.waveform) * rate / clip.sample_rate) > self.window:
            raise DocumentError(f"{name} has an audio clip of {seconds:g} s (at {clip.sample_rate} Hz); the audio "
                                f"encoder hears at most {self.window / rate:g} s: cut it into clips")
        wave = resample(clip.waveform, clip.sample_rate, rate)
        if self.config.usm is None:
            return self.audio(wave, sampling_rate=rate)
        wave = np.pad(wave, (0, self.window - len(wave)))
        return self.audio(wave, sampling_rate=rate)[0][0]
