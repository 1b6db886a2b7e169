"""Gemini's config (`GeminiConfig`, its `MediaTokens`): the model file (`model.py`) says what the fields mean,
the document format (`format.py`) where a model that writes images keeps its VQ codes (`place_codes`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from polymodal.config import Config, ConfigError, DecoderConfig, _check_positive
from polymodal.encoders.audio import AudioConfig
from polymodal.encoders.conformer import ConformerConfig
from polymodal.encoders.usm_features import UsmFeatureExtractor
from polymodal.encoders.vit import VisionConfig
from polymodal.encoders.vq import VQConfig
from polymodal.errors import check_number

MODALITIES = ("image", "audio", "video")
AUDIO_ENCODERS = ("whisper", "usm")  # Whisper-style (`audio`), or USM's Conformer as Gemma 3n has it (`usm`)


@dataclass
class MediaTokens(Config):
    """Token ids of the stream's media layout. A span is `start placeholder*P end`."""

    placeholder: int = 4  # replaced by one media embedding each (the built-in tokenizer's <image>)
    image: tuple[int, int] | None = (6, 7)  # (<img>, </img>); None: images need no wrapping (Fuyu)
    audio: tuple[int, int] | None = (8, 9)  # (<audio>, </audio>)
    video: tuple[int, int] | None = (10, 11)  # (<video>, </video>)
    draw: tuple[int, int] | None = None  # (begin, end) of an image the model writes; None: it writes text only

    def __post_init__(self) -> None:
        for kind in (*MODALITIES, "draw"):
            span = getattr(self, kind)
            if span is not None:
                span = tuple(span)  # JSON gives lists
                if len(span) != 2:
                    raise ConfigError(f"tokens.{kind} must be a (start, end) pair of ids, got {span}")
                for i in span:
                    check_number(f"tokens.{kind} ids", i, integer=True, error=ConfigError)
                setattr(self, kind, span)
        ids = self.ids()
        if len(set(ids)) != len(ids):
            raise ConfigError(f"media token ids must be distinct, got placeholder and spans {ids}")
        if self.image is None and (self.audio is not None or self.video is not None):
            raise ConfigError("unwrapped images (tokens.image=None) leave placeholders ambiguous once audio or "
                              "video spans exist; wrap images too")

    @property
    def wrapped(self) -> bool:
        return self.image is not None

    def ids(self) -> list[int]:
        return [self.placeholder, *(i for k in (*MODALITIES, "draw") for i in (getattr(self, k) or ()))]


@dataclass
class GeminiConfig(Config):

    text: DecoderConfig = field(default_factory=DecoderConfig)  # post-fusion norm: text.embed_norm
    tokens: MediaTokens = field(default_factory=MediaTokens)
    vision: VisionConfig | None = None  # image encoder; None: linear patch embedding (Fuyu)
    image_size: int = 32  # square images of this side (the ViT's when vision is set)
    patch_size: int = 8
    channels: int = 3
    patch_positions: bool = False  # a learned embedding per patch index, for linear patches (Fuyu has none)
    audio_encoder: str = "whisper"  # one of AUDIO_ENCODERS: which of `audio` / `usm` hears (the other is None)
    audio: AudioConfig | None = None  # the Whisper-style encoder; None: no audio input, or USM's
    usm: ConformerConfig | None = None  # the USM Conformer; None: no audio input, or Whisper's
    usm_seconds: int = 30  # USM clips are padded with silence to this window, which fixes their tokens
    audio_pool: int = 1  # average-pool the audio encoder's 50 Hz frames by this factor
    max_frames: int = 0  # learned temporal embeddings for video frames; 0: no video input
    modal_norm: bool = False  # a text.norm after each modality's projection into the decoder
    vq: VQConfig | None = None  # image output: the VQ tokenizer of the images it writes; None: text output only
    image_codes: int = 0  # token id of VQ code 0 (the codes are contiguous from it), with vq

    def __post_init__(self) -> None:
        _check_positive(self, "image_size", "patch_size", "channels", "audio_pool")
        if self.max_frames < 0:
            raise ConfigError(f"max_frames must be >= 0, got {self.max_frames}")
        if self.vision is not None and (self.vision.image_size, self.vision.patch_size, self.vision.channels) != (
                self.image_size, self.patch_size, self.channels):
            raise ConfigError(f"image_size/patch_size/channels ({self.image_size}, {self.patch_size}, {self.channels}) "
                              f"must equal the ViT's ({self.vision.image_size}, {self.vision.patch_size}, "
                              f"{self.vision.channels})")
        if self.patch_positions and self.vision is not None:
            raise ConfigError("patch_positions are for linear patches; the ViT (vision) has its own positions")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        self._check_audio()
        bad = [i for i in self.tokens.ids() if not 0 <= i < self.text.vocab_size]
        if bad:
            raise ConfigError(f"media token ids {bad} are outside the vocabulary [0, {self.text.vocab_size})")
        if self.vq is not None or self.tokens.draw is not None:
            check_image_output(self.vq, self.image_codes, self.tokens.draw, self.tokens.ids(), self.text.vocab_size)

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def _check_audio(self) -> None:
        if self.audio_encoder not in AUDIO_ENCODERS:
            raise ConfigError(f"audio_encoder must be one of {list(AUDIO_ENCODERS)}, got {self.audio_encoder!r}")
        other = "usm" if self.audio_encoder == "whisper" else "audio"
        if getattr(self, other) is not None:
            raise ConfigError(f"audio_encoder={self.audio_encoder!r} hears through "
                              f"{'audio' if other == 'usm' else 'usm'}, but {other} is set too; set it to None")
        _check_positive(self, "usm_seconds")
        if self.encoder_frames % self.audio_pool:
            raise ConfigError(f"the {self.audio_encoder} encoder's {self.encoder_frames} frames per clip must be "
                              f"divisible by audio_pool ({self.audio_pool})")

    @property
    def audio_tower(self) -> AudioConfig | ConformerConfig | None:
        """The config of the encoder that hears (`audio_encoder`), None without audio input."""
        return self.usm if self.audio_encoder == "usm" else self.audio

    def usm_features(self) -> UsmFeatureExtractor:
        """USM's log-mel front end (16 kHz) for clips of up to `usm_seconds`."""
        return UsmFeatureExtractor(n_mels=self.usm.n_mels, max_samples=self.usm_seconds * 16000)

    @property
    def usm_mel_frames(self) -> int:
        """Log-mel frames of a USM clip (its window)."""
        features = self.usm_features()
        return features.n_frames(features.max_samples)

    @property
    def encoder_frames(self) -> int:
        """Frames the audio encoder gives per clip (0 without audio), before audio_pool."""
        if self.audio_tower is None:
            return 0
        if self.audio_encoder == "usm":
            return self.usm.output_frames(self.usm_mel_frames)
        return self.audio.n_positions

    @property
    def tokens_per_clip(self) -> int:
        return self.encoder_frames // self.audio_pool


def check_image_output(vq: VQConfig | None, first_code: int, draw: tuple[int, int] | None, token_ids: list[int],
                       vocab_size: int) -> None:
    """A model that writes images needs both its VQ config and its (begin, end) tokens, and its codes must fit
    the vocabulary apart from every other special token."""
    if vq is None or draw is None:
        raise ConfigError(f"image output needs both vq and tokens.draw (begin, end); got vq="
                          f"{'set' if vq is not None else None} and tokens.draw={draw}")
    check_number("image_codes", first_code, integer=True, error=ConfigError)
    last = first_code + vq.num_embeddings
    if not 0 <= first_code <= vocab_size - vq.num_embeddings:
        raise ConfigError(f"image_codes: the {vq.num_embeddings} image codes from token {first_code} must fit in "
                          f"the vocabulary of {vocab_size}")
    clash = [i for i in token_ids if first_code <= i < last]
    if clash:
        raise ConfigError(f"special token ids {clash} fall among the image codes [{first_code}, {last})")

