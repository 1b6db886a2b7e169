"""The configs of the early-fusion families (PaliGemma, KOSMOS-1, Chameleon, Gemini).

They live below the models (`models/`) and the document formats and collators (`data/`), which both read
them, so data never imports a model module. Each family's model file says what the fields mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from polymodal.config import Config, ConfigError, DecoderConfig, _check_positive
from polymodal.encoders.audio import AudioConfig
from polymodal.encoders.vit import VisionConfig
from polymodal.encoders.vq import VQConfig
from polymodal.errors import check_number
from polymodal.fusion.perceiver import PerceiverConfig


@dataclass
class PaliGemmaConfig(Config):
    """The projector maps vision.dim to text.dim (HF's projection_dim, which must equal the text width).

    image_token_id: the placeholder id, inside text.vocab_size. A trainer with its own tokenizer
    sets both: `cfg.replace(text=cfg.text.replace(vocab_size=...), image_token_id=tok.token_id("<image>"))`."""

    vision: VisionConfig
    text: DecoderConfig
    image_token_id: int = 257152

    def __post_init__(self) -> None:
        if self.vision.variant != "siglip":
            raise ConfigError(f"PaliGemma's vision tower is a SigLIP ViT, got variant {self.vision.variant!r}")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(f"image_token_id ({self.image_token_id}) must be a token id below text.vocab_size "
                              f"({self.text.vocab_size})")

    @property
    def tokens_per_image(self) -> int:
        return self.vision.n_patches


@dataclass
class KosmosConfig(Config):
    vision: VisionConfig  # a CLIP ViT
    perceiver: PerceiverConfig  # over the vision width; n_latents = tokens per image
    text: DecoderConfig  # the Magneto decoder (`magneto_text`)
    image_token_id: int = 4  # `<image>`: starts an image (ids of `Tokenizer.train`'s control tokens)
    image_end_token_id: int = 5  # `</image>`: closes it
    placeholder_token_id: int = 0  # written in the n_image_latents slots whose embeddings an image replaces
    projector_bias: bool = True  # a bias on the linear map from resampled image features to the text width

    def __post_init__(self) -> None:
        ids = {"image_token_id": self.image_token_id, "image_end_token_id": self.image_end_token_id,
               "placeholder_token_id": self.placeholder_token_id}
        for name, value in ids.items():
            if not 0 <= value < self.text.vocab_size:
                raise ConfigError(f"{name} ({value}) must be a token id below text.vocab_size ({self.text.vocab_size})")
        if len(set(ids.values())) != 3:
            raise ConfigError(f"image_token_id, image_end_token_id and placeholder_token_id must differ, got {ids}")
        if self.vision.variant != "clip":
            raise ConfigError(f"KOSMOS-1 reads CLIP features; vision.variant must be 'clip', "
                              f"got {self.vision.variant!r}")
        if self.perceiver.max_media or self.perceiver.max_frames:
            raise ConfigError("KOSMOS-1 resamples each image on its own: perceiver.max_media and max_frames must "
                              f"be 0, got {self.perceiver.max_media} and {self.perceiver.max_frames}")

    @property
    def n_image_latents(self) -> int:
        return self.perceiver.n_latents

    def image_tokens(self) -> list[int]:
        """The ids one image takes in input_ids: <image>, n_image_latents placeholders, </image>."""
        return [self.image_token_id, *[self.placeholder_token_id] * self.n_image_latents, self.image_end_token_id]


def _chameleon_text() -> DecoderConfig:
    return DecoderConfig(qk_norm="layernorm", qk_norm_per_head=True, norm_eps=1e-5)


@dataclass
class ChameleonConfig(Config):
    text: DecoderConfig = field(default_factory=_chameleon_text)
    vq: VQConfig = field(default_factory=VQConfig)
    image_tokens: int | list[int] = 256  # token id of VQ code 0 (codes contiguous from it), or the token of each code
    image_token_id: int | None = None  # input placeholder filled with an input image's codes (HF `<image>`)
    begin_image_id: int | None = None  # `<img>`; None (with end_image_id): the model never writes images
    end_image_id: int | None = None  # `</img>`

    def __post_init__(self) -> None:
        V, K = self.text.vocab_size, self.vq.num_embeddings
        if isinstance(self.image_tokens, int):
            if not 0 <= self.image_tokens <= V - K:
                raise ConfigError(f"image_tokens: the {K} image codes from token {self.image_tokens} must fit in "
                                  f"the vocabulary of {V}")
        else:
            tokens = self.image_tokens
            if len(tokens) != K or len(set(tokens)) != K or not all(0 <= t < V for t in tokens):
                raise ConfigError(f"image_tokens must list {K} distinct token ids in [0, {V}), one per VQ code; "
                                  f"got {len(tokens)} ids")
        codes = set(self.code_tokens)
        for name in ("image_token_id", "begin_image_id", "end_image_id"):
            value = getattr(self, name)
            if value is not None and (not 0 <= value < V or value in codes):
                raise ConfigError(f"{name} must be a token in [0, {V}) that is not an image code, got {value}")
        if (self.begin_image_id is None) != (self.end_image_id is None):
            raise ConfigError("give both begin_image_id and end_image_id, or neither")

    @property
    def code_tokens(self) -> list[int]:
        """The token id of each VQ code, in code order."""
        if isinstance(self.image_tokens, int):
            return list(range(self.image_tokens, self.image_tokens + self.vq.num_embeddings))
        return list(self.image_tokens)


MODALITIES = ("image", "audio", "video")


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
    audio: AudioConfig | None = None  # None: no audio input
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
        if self.audio is not None and self.audio.n_positions % self.audio_pool:
            raise ConfigError(f"audio.n_positions ({self.audio.n_positions}) must be divisible by audio_pool "
                              f"({self.audio_pool})")
        bad = [i for i in self.tokens.ids() if not 0 <= i < self.text.vocab_size]
        if bad:
            raise ConfigError(f"media token ids {bad} are outside the vocabulary [0, {self.text.vocab_size})")
        if self.vq is not None or self.tokens.draw is not None:
            check_image_output(self.vq, self.image_codes, self.tokens.draw, self.tokens.ids(), self.text.vocab_size)

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_clip(self) -> int:
        return self.audio.n_positions // self.audio_pool if self.audio is not None else 0


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
