"""A complete Hugging Face directory from a polymodal checkpoint, and the way back for processor settings.

Beside the weights and config.json that `hf.save_hf` writes, `transformers` needs the files its Auto
classes read (the layout `PaliGemmaProcessor.save_pretrained` writes): the tokenizer with a
`tokenizer_config.json` naming its special tokens, `preprocessor_config.json` (the image processor,
with PaliGemma's `image_seq_length`), `processor_config.json`, `generation_config.json`, a chat template where polymodal's layout has one that HF
can express (the text-only decoders'), and a model card.
HF's `PaliGemmaProcessor` lays a prompt out as `<image>` * image_seq_length, `<bos>`, prompt, "\\n" with
`add_bos_token` off: the ids `PaliGemmaFormat` gives, so HF's greedy answer is ours.
A model holding a mask VQ-VAE (a PaliGemma that answers with masks) gets it as `vae-oid.npz`, big_vision's file
and layout (HF's PaliGemma has no place for it), which polymodal finds there when it loads the directory to train
(`convert.mask_vae_file.found_mask_vae`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from torch import nn

from polymodal.config import Config, ConfigError
from polymodal.convert.hf import FAMILIES, save_hf
from polymodal.data.processors import ImageProcessor
from polymodal.data.synthetic import WORLD
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.mask_vae import MASK_VAE_FILE, mask_vae_npz, mask_vae_of
from polymodal.errors import CheckpointError, InputError
from polymodal.families import spec_of
from polymodal.families.collators import make_collator

# HF model_type -> (image processor class, processor class) for the families whose polymodal image
# preprocessing an HF processor reproduces; the others get no preprocessor_config.json (the card says so)
PROCESSORS = {
    "paligemma": ("SiglipImageProcessor", "PaliGemmaProcessor"),
    "siglip": ("SiglipImageProcessor", "SiglipProcessor"),
    "clip": ("CLIPImageProcessor", "CLIPProcessor"),
}
TEXT_CONFIG = {"paligemma": "text", "chameleon": "text", "idefics": "text", "siglip": "text",
               "clip": "text"}  # where a family keeps its decoder (a dual encoder its text tower)
# a dual encoder's caption layout (families/contrastive/format.PairFormat.text), right-padded: HF's processor
# then gives its ids (SigLIP's with padding="max_length", to the text tower's max_seq_len, as HF's SigLIP docs say)
CAPTION_TEMPLATES = {"siglip": ("$A", "eos_token"), "clip": ("bos_token", "$A", "eos_token")}
_RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL's numbers, as HF stores them
# polymodal's text-only layout (families/decoder/format.DecoderFormat): <bos>, then each segment's text and "\n". Roles are
# not marked, as polymodal's documents mark none; a message's text is read as HF reads it (special-token text
# such as "<eos>" becomes the token, where polymodal's collator keeps it text).
DECODER_CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{{ '\\n' }}{% endfor %}"


def model_type_of(model: nn.Module) -> str:
    """The HF model_type a polymodal model is written as: of its family's (`spec.hf`), the one, or the one
    whose config conversion takes this model's config (Llama or Gemma, CLIP or SigLIP)."""
    kinds = list(spec_of(model).hf) if isinstance(getattr(model, "config", None), Config) else []
    refusals = {t: _refusal(FAMILIES[t], model.config) for t in kinds} if len(kinds) > 1 else {}
    if refusals:
        kinds = [t for t in kinds if refusals[t] is None]
    if len(kinds) == 1:
        return kinds[0]
    why = "".join(f"; {t}: {reason}" for t, reason in refusals.items())
    raise InputError(f"a {type(getattr(model, 'config', model)).__name__} model has no Hugging Face model_type "
                     f"polymodal writes{why}; give --model-type, one of {sorted(FAMILIES)}")


def _refusal(family, config) -> str | None:
    """Why the family's HF config conversion refuses `config`; None when it takes it."""
    try:
        family.config_to_hf(config)
    except ConfigError as e:
        return str(e)
    return None


def export_hf(model: nn.Module, tokenizer: Tokenizer | None, target: str | Path, model_type: str | None = None,
              card: str = "", max_shard_size: int | str = "50GB") -> str:
    """Write `model` as a complete HF directory (atomic; HF's shards above `max_shard_size`); returns the
    model_type written."""
    model_type = model_type or model_type_of(model)
    files = {"generation_config.json": _json(generation_config(model.config, model_type))}
    if tokenizer is not None:
        files.update(tokenizer_files(model, tokenizer, model_type))
    files["README.md"] = (card or model_card(model_type, None, {})).encode()
    vae = mask_vae_of(model)
    if vae is not None:  # in the same swap as the weights: the directory never lacks it
        files[MASK_VAE_FILE] = mask_vae_npz(vae)
    save_hf(model, target, model_type, files, max_shard_size)
    return model_type


def _json(d: dict) -> bytes:
    return (json.dumps(d, indent=2) + "\n").encode()


def _text(cfg, model_type: str):
    return getattr(cfg, TEXT_CONFIG[model_type]) if model_type in TEXT_CONFIG else cfg


def generation_config(cfg, model_type: str) -> dict:
    """Greedy, stopping at the tokenizer's end token, up to the model's context (HF's default is 20 tokens
    in all, fewer than PaliGemma's image placeholders)."""
    text = _text(cfg, model_type)
    ids = {k: getattr(text, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hasattr(text, k)}
    length = getattr(text, "max_seq_len", None)
    return {**ids, **({"max_length": length} if length else {}), "do_sample": False}


def tokenizer_files(model: nn.Module, tokenizer: Tokenizer, model_type: str) -> dict[str, bytes]:
    """tokenizer.json (or SentencePiece files) with tokenizer_config.json, and the processor configs."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    ids = tokenizer.special_ids
    config = {"tokenizer_class": "PreTrainedTokenizerFast" if "tokenizer.json" in files else "LlamaTokenizer",
              **{k: tokenizer.decode([ids[v]], skip_special_tokens=False) for k, v in names.items()},
              "add_bos_token": False, "add_eos_token": False, "padding_side": "left"}
    length = getattr(_text(model.config, model_type), "max_seq_len", None)
    if length:
        config["model_max_length"] = length
    kinds = PROCESSORS.get(model_type)
    if model_type == "paligemma":  # HF's PaliGemmaProcessor takes the image token from the tokenizer
        config["extra_special_tokens"] = {"image_token": tokenizer.decode([ids["<image>"]], skip_special_tokens=False)}
    if model_type in CAPTION_TEMPLATES and "tokenizer.json" in files:
        files["tokenizer.json"] = _with_template(files["tokenizer.json"], CAPTION_TEMPLATES[model_type], config)
        config["padding_side"] = "right"
    files["tokenizer_config.json"] = _json(config)
    if model_type in ("llama", "gemma"):
        files["chat_template.jinja"] = DECODER_CHAT_TEMPLATE.encode()
    images = image_processor(model, tokenizer)
    if kinds is not None and images is not None:
        extra = {"image_seq_length": model.config.tokens_per_image} if model_type == "paligemma" else {}
        files["preprocessor_config.json"] = _json({**image_processor_dict(images, kinds[0]),
                                                   "processor_class": kinds[1], **extra})
        files["processor_config.json"] = _json({"processor_class": kinds[1], **extra})
    return files


def _with_template(tokenizer_json: bytes, parts: tuple[str, ...], config: dict) -> bytes:
    """tokenizer.json whose post-processor lays a text out as `parts` ("$A" the text, the others tokenizer_config
    names of special tokens), as HF's tokenizer applies it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.processors import TemplateProcessing

    hf = HFTokenizer.from_str(tokenizer_json.decode())
    special = [(config[p], hf.token_to_id(config[p])) for p in parts if p != "$A"]
    hf.post_processor = TemplateProcessing(single=" ".join(config.get(p, p) for p in parts), special_tokens=special)
    return hf.to_str().encode()


def image_processor(model: nn.Module, tokenizer: Tokenizer) -> ImageProcessor | None:
    """The image processor polymodal's collator uses for this model (a format's, or a pair collator's own)."""
    collator = make_collator(model.config, tokenizer)
    return getattr(getattr(collator, "format", collator), "images", None)


def image_processor_dict(proc: ImageProcessor, kind: str) -> dict:
    """An HF preprocessor_config.json's image settings that `ImageProcessor.from_hf_dict` reads back as `proc`."""
    if isinstance(proc.size, int):
        size = {"shortest_edge": proc.size}
    else:
        size = {"height": proc.size[0], "width": proc.size[1]}
    d = {"image_processor_type": kind, "do_resize": True, "size": size, "resample": _RESAMPLE[proc.resample],
         "do_center_crop": proc.do_center_crop, "do_rescale": True, "rescale_factor": proc.rescale_factor,
         "do_normalize": True, "image_mean": list(proc.image_mean), "image_std": list(proc.image_std),
         "do_convert_rgb": proc.do_convert_rgb}
    if proc.crop_size is not None:
        d["crop_size"] = {"height": proc.crop_size[0], "width": proc.crop_size[1]}
    return d


def check_processor(directory: Path, model: nn.Module, tokenizer: Tokenizer) -> None:
    """`--to polymodal`: an HF directory's preprocessor_config.json must preprocess images as polymodal will
    for this model (its collator's processor), else the converted model would see other pixels."""
    file = directory / "preprocessor_config.json"
    images = image_processor(model, tokenizer)
    if not file.is_file() or images is None:
        return
    theirs = ImageProcessor.from_hf_dict(json.loads(file.read_text()))
    differ = [f"{k}: {getattr(theirs, k)!r} there, {getattr(images, k)!r} here"
              for k in ("size", "resample", "do_center_crop", "crop_size", "image_mean", "image_std")
              if getattr(theirs, k) != getattr(images, k)]
    if differ:
        raise CheckpointError(f"{file} preprocesses images otherwise than polymodal does for this "
                         f"{type(model.config).__name__} ({'; '.join(differ)}): the converted model would see other "
                         "pixels")


def model_card(model_type: str, run: Path | None, trained: dict, step: int | None = None) -> str:
    """A short README.md: what the model is, what it was trained on, its held-out figures when the run has them."""
    lines = [f"# {run.name if run else 'polymodal model'}", "",
             f"A `{model_type}` checkpoint exported by polymodal (`polymodal convert --to hf`)."]
    kinds = PROCESSORS.get(model_type)
    if kinds:
        what = ("embeddings (texts padded to max_length)" if model_type == "siglip" else "embeddings"
                if model_type in CAPTION_TEMPLATES else "greedy answers")
        lines += ["", f"Load it with `AutoProcessor` ({kinds[1]}) and the model's Auto class; its {what} are "
                  "polymodal's."]
    else:
        lines += ["", "No HF processor reproduces polymodal's media layout for this family: build inputs with "
                  "polymodal's collator (`polymodal.families.collators.make_collator`)."]
    if trained:
        data = trained.get("data")
        what = (f"the built-in synthetic world (tasks: {', '.join(trained.get('tasks', []))})" if data == "world"
                else f"`{data}`")
        lines += ["", "## Training", "", f"Trained on {what} for {trained.get('max_steps')} steps of "
                  f"{trained.get('batch_size')} documents (learning rate {trained.get('lr')}), "
                  + (f"from `{trained['init_from']}`." if trained.get("init_from") else "from scratch.")]
    lines += _held_out(run, step, trained)
    return "\n".join(lines) + "\n"


def _held_out(run: Path | None, step: int | None, trained: dict) -> list[str]:
    """The eval record of the run's metrics.jsonl at the checkpoint's step (or its last one)."""
    path = run / "metrics.jsonl" if run else None
    if path is None or not path.is_file():
        return []
    evals = [r for r in map(json.loads, path.read_text().splitlines()) if "eval_loss" in r]
    if step is not None:
        evals = [r for r in evals if r["step"] == step] or evals
    if not evals:
        return []
    r = evals[-1]
    lines = ["", "## Held-out figures", "", f"At step {r['step']}: held-out loss {r['eval_loss']:.4f}."]
    accuracy = {k.removeprefix("accuracy/"): v for k, v in r.items() if k.startswith("accuracy/")}
    if accuracy:
        lines += ["", "Greedy answers to the held-out validation questions of each task scored during training "
                  "(`polymodal eval` scores the test questions, beside blind baselines):", "",
                  "| task | accuracy | chance |", "|---|---|---|"]
        lines += [f"| {task} | {acc:.1%} | {WORLD.chance(task):.1%} |" for task, acc in accuracy.items()]
    return lines
