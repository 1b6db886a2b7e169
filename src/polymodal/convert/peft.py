"""LoRA adapters in HF peft's layout: `adapter_config.json` + `adapter_model.safetensors`.

A model family with an HF key map (Llama, Gemma, PaliGemma) names its adapters as peft does on the
transformers model, `base_model.model.<HF module>.lora_A.weight`, so an adapter trained here on an HF
checkpoint loads into transformers + peft with the same logits, and one trained there loads here.
The names come from the same key maps as the checkpoint converter (`convert/hf.py`): a fused QKV or
gate/up layer gets one adapter per HF projection it holds. Other families use their own module paths
(`<path>.<slice>`), which only polymodal reads.

Trainable token rows (`add_lora(..., trainable_tokens=ids)`, `nn.lora.TrainableRows`) are peft's trainable
tokens: `trainable_token_indices` in the config (a list when only the embedding table has them, as for a tied
head, which peft ties itself; else `{"embed_tokens": ids, "lm_head": ids}`) and each table's rows saved as
`base_model.model.<HF module>.token_adapter.trainable_tokens_delta`, shape (len(ids), dim), the rows' values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from polymodal.convert.hf import FAMILIES as HF_FAMILIES
from polymodal.errors import CheckpointError, InputError, InputTypeError, MissingFileError, check_finite, check_number
from polymodal.families import FAMILIES
from polymodal.nn import lora
from polymodal.nn.transformer import Decoder
from polymodal.serialization import atomic_directory, save_state_dict

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TOKENS_KEY = ".token_adapter.trainable_tokens_delta"

# config class -> (the HF model_type whose key map names its modules, (prefix in the key map's checkpoint
# names, prefix of the same module inside transformers 5's model, which is what peft names)): each spec's `peft`
HF_NAMES: dict[type, tuple[str, tuple[tuple[str, str], ...]]] = {
    spec.config: spec.peft for spec in FAMILIES.values() if spec.peft is not None}
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
               "modules_to_save": None, "layers_to_transform": None, "target_parameters": None}


def _rename(name: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for old, new in prefixes:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def slot_names(model: nn.Module) -> dict[tuple[str, str], str]:
    """(module path, slice) of every linear layer LoRA can adapt -> the module name its adapter is saved under.
    With an HF key map, layers that are no linear module in HF (the SigLIP head's fused in_proj) are left out."""
    slots = lora.linear_slots(model)
    config = getattr(model, "config", None)
    if type(config) not in HF_NAMES:
        return {(slot.path, s.name): f"{slot.path}.{s.name}" for slot in slots for s in slot.slices}
    model_type, prefixes = HF_NAMES[type(config)]
    rules = {r.ours: r for r in HF_FAMILIES[model_type].rules(config) if r.rows is None}
    names = {}
    for slot in slots:
        rule = rules.get(f"{slot.path}.weight")
        if rule is not None and len(rule.theirs) == len(slot.slices):
            for s, theirs in zip(slot.slices, rule.theirs):
                names[(slot.path, s.name)] = _rename(theirs.removesuffix(".weight"), prefixes)
    return names


def hf_module_name(model: nn.Module, path: str) -> str:
    """The name peft gives the module at `path` (its HF name for a family with a key map, else the path)."""
    config = getattr(model, "config", None)
    if type(config) not in HF_NAMES:
        return path
    model_type, prefixes = HF_NAMES[type(config)]
    rule = next((r for r in HF_FAMILIES[model_type].rules(config) if r.ours == f"{path}.weight"), None)
    if rule is None or len(rule.theirs) != 1:
        return path
    return _rename(rule.theirs[0].removesuffix(".weight"), prefixes)


def row_paths(model: nn.Module) -> list[str]:
    """Where trainable token rows go: the language decoder's embedding table and, when untied, its output head."""
    found = [(path, m) for path, m in model.named_modules() if isinstance(m, Decoder)]
    if not found:
        raise InputError(f"this {type(model).__name__} has no language decoder whose token rows could train")
    path, decoder = found[0]
    at = f"{path}." if path else ""
    return [f"{at}tok_embeddings"] + ([f"{at}output"] if decoder.output is not None else [])


def _check_token_ids(ids, where: str) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                 for i in ids):
        raise InputError(f"{where} must be a non-empty list of token ids, got {ids!r}"[:300])
    return list(ids)


def _parts(model: nn.Module, parts: tuple[str, ...] | list[str] | None) -> list[str]:
    """Module-path prefixes of the parts to adapt: by default the language decoder (the whole model
    when it is a decoder itself)."""
    children = [name for name, m in model.named_children() if any(isinstance(x, nn.Linear) for x in m.modules())]
    if parts is None:
        return ["decoder."] if "decoder" in children else [""]
    unknown = sorted(set(parts) - set(children))
    if unknown:
        raise InputError(f"unknown LoRA parts {unknown}; this {type(model).__name__} has {children}")
    return [f"{p}." for p in parts]


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16, targets: list[str] | None = None,
             dropout: float = 0.0, parts: tuple[str, ...] | list[str] | None = None,
             trainable_tokens: list[int] | None = None) -> nn.Module:
    """Freeze the model and give LoRA adapters to its linear layers named in `targets` (as HF/peft name
    them: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, fc1, ...; "q" means "q_proj"),
    inside `parts` (top-level modules, e.g. ["vision", "projector", "decoder"]; default: the decoder).
    targets=None: every attention and MLP projection of those parts. trainable_tokens: token ids whose rows
    of the decoder's embedding table (and of its output head, tied or not) train too, as peft's
    `trainable_token_indices` (new tokens such as PaliGemma's `<locNNNN>`)."""
    check_number("LoRA rank", rank, integer=True, at_least=1)
    check_number("LoRA alpha", alpha, above=0)
    rows = None if trainable_tokens is None else (row_paths(model), _check_token_ids(trainable_tokens,
                                                                                      "trainable_tokens"))
    for path in rows[0] if rows else []:  # before the model changes
        lora.check_row_ids(rows[1], model.get_submodule(path).weight.shape[0])
    prefixes = _parts(model, parts)
    names = slot_names(model)
    slots = [slot for slot in lora.linear_slots(model) if f"{slot.path}.".startswith(tuple(prefixes))]
    leaf = {(slot.path, s.name): names[(slot.path, s.name)].rsplit(".", 1)[-1]
            for slot in slots for s in slot.slices if (slot.path, s.name) in names}
    if targets is None:
        chosen = {(slot.path, s.name) for slot in slots if slot.kind != "other" for s in slot.slices} & set(leaf)
    else:
        if isinstance(targets, str):
            raise InputTypeError(f"targets must be a list of names, got the string {targets!r}")
        known = sorted(set(leaf.values()))
        wanted = set()
        for t in targets:
            name = t if t in known else f"{t}_proj"
            if name not in known:
                raise InputError(f"unknown LoRA target {t!r}; the linear layers of "
                                 f"{[p.rstrip('.') or type(model).__name__ for p in prefixes]} are named {known}")
            wanted.add(name)
        chosen = {key for key, name in leaf.items() if name in wanted}
    plan = {slot.path: tuple(s for s in slot.slices if (slot.path, s.name) in chosen) for slot in slots}
    lora.add(model, {path: slices for path, slices in plan.items() if slices}, rank, alpha, dropout)
    if rows is not None:
        lora.train_rows(model, *rows)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights: plain linear layers again, the same outputs, the base's keys."""
    if not lora.adapters(model):
        raise InputError("the model has no LoRA adapters to merge (add_lora or load_adapter first)")
    lora.merge(model)
    return model


def save_adapter(model: nn.Module, directory: str | Path, base_model: str | Path | None = None) -> None:
    """Write the model's adapters as a peft adapter directory (atomically). base_model: recorded as
    `base_model_name_or_path`, where `pm.from_pretrained(directory)` finds the base weights."""
    layout = adapter_layout(model)
    with atomic_directory(directory) as tmp:
        write_adapter(layout, tmp, model.state_dict(), base_model)


def adapter_layout(model: nn.Module) -> dict:
    """What a peft adapter file needs to know of the model: adapter_config.json, and each saved tensor's
    name -> the model's parameter name. Taken before a trainer wraps the model's modules."""
    found = lora.adapters(model)
    if not found:
        raise InputError("the model has no LoRA adapters to save (add_lora first)")
    (first, *_), names = found.values(), slot_names(model)
    tensors = {}
    for path, layer in found.items():
        if (layer.rank, layer.alpha, layer.lora_dropout.p) != (first.rank, first.alpha, first.lora_dropout.p):
            raise InputError(f"peft's adapter_config holds one rank, alpha and dropout; {path} differs")
        for s in layer.slices:
            for which in "AB":
                tensors[f"{PEFT_PREFIX}{names[(path, s.name)]}.lora_{which}.weight"] = f"{path}.lora_{which}.{s.name}"
    modules = sorted({key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for key in tensors})
    indices = {}
    for path, rows in lora.trained_rows(model).items():
        name = hf_module_name(model, path)
        tensors[f"{PEFT_PREFIX}{name}{TOKENS_KEY}"] = f"{path}.trainable_tokens"
        indices[name.rsplit(".", 1)[-1]] = rows.token_indices.tolist()
    config = {"peft_type": "LORA", "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": first.lora_dropout.p,
              "target_modules": modules, "use_rslora": first.scale != first.alpha / first.rank,
              "init_lora_weights": True, "inference_mode": True, "task_type": None, **UNSUPPORTED,
              "trainable_token_indices": (next(iter(indices.values())) if len(indices) == 1 else indices) or None}
    return {"config": config, "tensors": tensors}


def write_adapter(layout: dict, directory: Path, state: dict[str, torch.Tensor],
                  base_model: str | Path | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors into an existing directory, the values taken from
    `state` (the model's state dict, or a trainer's gathered one) by parameter name."""
    config = {**layout["config"], "base_model_name_or_path": str(base_model) if base_model is not None else None}
    tensors = {key: state[name].detach() for key, name in layout["tensors"].items()}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_state_dict(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt", "producer": "polymodal"})


def read_adapter_config(directory: str | Path) -> dict:
    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise MissingFileError(f"{directory} has no {name}: not a LoRA adapter directory")
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{directory / ADAPTER_CONFIG} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise InputError(f"{directory / ADAPTER_CONFIG} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise InputError(f"{directory}: expected a LoRA adapter (peft_type 'LORA'), got {config.get('peft_type')!r}")
    for key, plain in UNSUPPORTED.items():
        if config.get(key, plain) not in (plain, None, {}):
            raise InputError(f"{directory}: {key}={config[key]!r} is not supported (expected {plain!r})")
    where = directory / ADAPTER_CONFIG
    check_number(f"{where}: r", config.get("r"), integer=True, at_least=1)
    check_number(f"{where}: lora_alpha", config.get("lora_alpha"), above=0)
    check_number(f"{where}: lora_dropout", config.get("lora_dropout", 0.0), at_least=0.0, below=1.0)
    if not isinstance(config.get("use_rslora", False), bool):
        raise InputError(f"{where}: use_rslora must be true or false, got {config['use_rslora']!r}")
    tokens = config.get("trainable_token_indices")
    if isinstance(tokens, dict):
        for name, ids in tokens.items():
            _check_token_ids(ids, f"{where}: trainable_token_indices[{name!r}]")
    elif tokens is not None:
        _check_token_ids(tokens, f"{where}: trainable_token_indices")
    return config


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Read a peft LoRA adapter directory (written here or by peft) into the model: adds the adapters
    (freezing the rest) unless the model has them already, then loads their weights."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    by_name = {name: key for key, name in slot_names(model).items()}
    model_type = HF_NAMES.get(type(getattr(model, "config", None)), (None,))[0]
    family = HF_FAMILIES.get(model_type)
    plan: dict[str, dict[str, tuple]] = {}
    try:
        with safe_open(directory / ADAPTER_WEIGHTS, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS} is not a readable safetensors file ({e})") from e
    rows = _row_plan(model, directory, config, tensors)
    for key, tensor in tensors.items():
        check_finite(f"{directory / ADAPTER_WEIGHTS}: {key}", tensor)
        if key.endswith(TOKENS_KEY):
            continue
        name, _, which = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if which not in ("A.weight", "B.weight"):
            raise InputError(f"{directory}: {key} is not a LoRA A/B weight")
        if name not in by_name and family is not None:  # another HF layout of the same module (transformers 4.x)
            name = family.canonical(f"{name}.weight").removesuffix(".weight")
            name = _rename(name, HF_NAMES[type(model.config)][1])
        if name not in by_name:
            raise InputError(f"{directory} is an adapter for another model: it adapts {name!r}, which this "
                             f"{type(model).__name__} does not have (its linear layers are named like "
                             f"{sorted(by_name)[:3]})")
        path, slice_name = by_name[name]
        plan.setdefault(path, {})[slice_name] = plan.get(path, {}).get(slice_name, ()) + ((which[0], tensor),)
    for path, got in plan.items():  # an A without its B (or a B without its A) would load as no update at all
        for slice_name, pair in got.items():
            if sorted(which for which, _ in pair) != ["A", "B"]:
                have = " and ".join(f"lora_{which}" for which, _ in pair)
                raise InputError(f"{directory / ADAPTER_WEIGHTS} holds {have} of {path} ({slice_name}), expected "
                                 "one lora_A and one lora_B: the adapter file is incomplete")
    slots = {slot.path: slot for slot in lora.linear_slots(model)}
    existing = lora.adapters(model)
    if existing:
        expected = {(p, s.name) for p, layer in existing.items() for s in layer.slices}
        given = {(p, s) for p, got in plan.items() for s in got}
        if expected != given:
            raise InputError(f"{directory} adapts other layers than the model's adapters: missing "
                             f"{sorted(expected - given)[:4]}, extra {sorted(given - expected)[:4]}")
        first, rslora = next(iter(existing.values())), config.get("use_rslora", False)
        scale = config["lora_alpha"] / (math.sqrt(config["r"]) if rslora else config["r"])  # as LoRALinear's
        if (first.rank, first.alpha, first.scale) != (config["r"], config["lora_alpha"], scale):
            raise InputError(f"{directory} has r={config['r']}, lora_alpha={config['lora_alpha']}, use_rslora="
                             f"{rslora} (scale {scale:g}); the model's adapters r={first.rank}, alpha={first.alpha}, "
                             f"scale {first.scale:g}")
    for path, got in plan.items():  # every shape checked before the model changes
        linear = model.get_submodule(path)
        for slice_name, pair in got.items():
            s = next(s for s in slots[path].slices if s.name == slice_name)
            for which, tensor in pair:
                want = (config["r"], linear.in_features) if which == "A" else (s.stop - s.start, config["r"])
                if tuple(tensor.shape) != want:
                    raise InputError(f"{directory}: {path} ({slice_name}) lora_{which} has shape {tuple(tensor.shape)}, "
                                     f"this model expects {want} (r={config['r']}): an adapter for another model")
    if not existing:
        lora.add(model, {path: tuple(s for s in slots[path].slices if s.name in got) for path, got in plan.items()},
                 config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), config.get("use_rslora", False))
        existing = lora.adapters(model)
    for path, got in plan.items():
        for slice_name, pair in got.items():
            for which, tensor in pair:
                (existing[path].lora_A if which == "A" else existing[path].lora_B)[slice_name].data.copy_(tensor)
    trained = lora.trained_rows(model)
    for path, (indices, tensor) in rows.items():
        if path not in trained:
            lora.train_rows(model, [path], indices)
        lora.trained_rows(model)[path].trainable_tokens.data.copy_(tensor)
    return model


def _row_plan(model: nn.Module, directory: Path, config: dict,
              tensors: dict[str, torch.Tensor]) -> dict[str, tuple[list[int], torch.Tensor]]:
    """The adapter's trainable token rows: our module path -> (token ids, rows), each checked against the model
    (and against rows it trains already) before anything changes."""
    saved = {key.removeprefix(PEFT_PREFIX).removesuffix(TOKENS_KEY): t for key, t in tensors.items()
             if key.endswith(TOKENS_KEY)}
    if not saved:
        return {}
    ours = {hf_module_name(model, path): path for path in row_paths(model)}
    indices = config.get("trainable_token_indices")
    out, trained = {}, lora.trained_rows(model)
    for name, tensor in saved.items():
        if name not in ours:
            raise InputError(f"{directory} is an adapter for another model: it trains token rows of {name!r}, which "
                             f"this {type(model).__name__} does not have (it has {sorted(ours)})")
        ids = indices.get(name, indices.get(name.rsplit(".", 1)[-1])) if isinstance(indices, dict) else indices
        if ids is None:
            raise InputError(f"{directory} saves token rows of {name!r} but its trainable_token_indices name none")
        path = ours[name]
        dim = model.get_submodule(path).weight.shape[1]
        if tuple(tensor.shape) != (len(ids), dim):
            raise InputError(f"{directory}: token rows of {name!r} have shape {tuple(tensor.shape)}, this model "
                             f"expects {(len(ids), dim)} ({len(ids)} trainable_token_indices)")
        if path in trained and trained[path].token_indices.tolist() != list(ids):
            raise InputError(f"{directory} trains other token rows of {name!r} than the model's")
        out[path] = (list(ids), tensor)
    return out
