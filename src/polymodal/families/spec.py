"""What shared machinery (generation, training, serving, the CLI, conversion) knows of a family: its spec.

In the spirit of torchtitan's `TrainSpec`: a family registers one `FamilySpec` in `families.FAMILIES`, and
the engine, the trainer, the server and the CLI read it instead of probing a model's type or attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


def no_placeholders(config) -> tuple[int, ...]:
    return ()


@dataclass(frozen=True)
class FamilySpec:
    config: type  # the config dataclass
    model: type  # built as model(config, backend=...)
    format: type | None = None  # lays a document out as the model reads it; None: the family reads no documents
    collator: type | None = None  # batches encoded documents; None: `data.collate.Collator`
    per_token_inputs: tuple[str, ...] = ()  # model inputs laid out like input_ids (B, S, ...): padded and moved with it
    placeholders: Callable[[object], tuple[int, ...]] = no_placeholders  # token ids whose embeddings media replace
    pairs: bool = False  # learns by contrast from image-text pairs (no labels, no packing) and writes nothing
    # answers with places (data/locations.py): the format writes boxes and masks as location and segmentation
    # tokens, and the config's `mask_vae` (a MaskVAEConfig or None) is the mask VQ-VAE that codes them
    locations: bool = False
    needs_image: bool = False  # every prompt carries an image (PaliGemma: HF's processor refuses one without)
    # reads one prompt, then writes one answer (a prefix-LM's layout): no conversation, each question asked anew
    single_turn: bool = False
    presets: dict[str, Callable[[], object]] = field(default_factory=dict)  # preset name -> its config
    hf: dict[str, object] = field(default_factory=dict)  # HF model_type -> the conversion rules it reads and writes
    # LoRA adapters named as HF peft names them: (the `hf` model_type whose key map names the modules, (prefix in
    # that key map's checkpoint names, prefix of the module inside transformers' model) renames); None: adapters
    # named by polymodal's module paths, which only polymodal reads
    peft: tuple[str, tuple[tuple[str, str], ...]] | None = None

    @property
    def generates(self) -> bool:
        return not self.pairs

    @property
    def trains_parts(self) -> bool:
        """Whether the model can train chosen parts only, the rest frozen (`model.trainable(parts)`)."""
        return callable(getattr(self.model, "trainable", None))
