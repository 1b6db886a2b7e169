"""The import graph of src/polymodal, read with `ast`: no cycle, and no import that points up a layer.

Every import counts, a lazy one inside a function included. A module may import its own package and
any lower layer; packages on one layer (models and data, ...) never import each other. Every module sits
in a layer: the root package's entry holds its `__init__` alone, so a new module must be placed."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = [  # lowest first, as DESIGN.md lays the package out: nn <- encoders/fusion <- families <- the machinery <- cli
    ("polymodal.errors", "polymodal.progress"),
    ("polymodal.weights",),  # safetensors files read and written one tensor at a time
    ("polymodal.config", "polymodal.serialization", "polymodal.runs"),  # runs: where a run directory keeps its checkpoints
    ("polymodal.nn",),
    ("polymodal.encoders",),
    ("polymodal.fusion",),  # the Perceiver Resampler and the early-fusion core (spans, writer, table of modalities)
    # models.parts: freezing by named parts; data reads no family; convert.rules: the pieces of every HF key map
    ("polymodal.models", "polymodal.data", "polymodal.convert.rules"),
    # the key maps the family specs read: the encoders' (ViT, Whisper, Gemma 3n's audio tower) and Cohere's decoder
    ("polymodal.convert.hf_vision", "polymodal.convert.hf_whisper", "polymodal.convert.hf_gemma3n_audio",
     "polymodal.convert.hf_cohere"),
    ("polymodal.families",),  # one folder per family, and the one dict of their specs that everything above reads
    ("polymodal.generation", "polymodal.convert", "polymodal.presets"),
    ("polymodal.api",),
    ("polymodal.evaluate",),  # world.py, user_data.py (+ report), metrics.py and ngrams.py
    ("polymodal.retrieval", "polymodal.evaluate_cot"),  # evaluate's scoring for the dual encoders; chain-of-thought routing
    ("polymodal.train",),
    ("polymodal",),  # the package's own __init__ (the public API) alone: a module nobody placed is in no layer
    ("polymodal.serve",),
    ("polymodal.cli",),
]
ROOT = "polymodal"


def modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "polymodal").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The polymodal modules `name` imports: `from a import b` is a.b when that is a module, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def holds(entry: str, module: str) -> bool:
    """A layer entry holds the module of its name and, unless it is the root package, every module under it."""
    return module == entry or (entry != ROOT and module.startswith(entry + "."))


def group(module: str) -> tuple[int, str]:
    """(layer index, the layer entry holding the module): the longest matching prefix."""
    matches = [(len(entry), i, entry) for i, layer in enumerate(LAYERS) for entry in layer if holds(entry, module)]
    assert matches, f"{module} is in no layer; add it to LAYERS"
    _, i, entry = max(matches)
    return i, entry


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in modules() if not any(holds(e, m) for layer in LAYERS for e in layer))
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"


def test_every_import_points_down():
    upward = []
    for module, deps in graph().items():
        layer, entry = group(module)
        for dep in deps:
            dep_layer, dep_entry = group(dep)
            if dep_entry != entry and dep_layer >= layer:
                upward.append(f"{module} -> {dep}")
    assert not upward, "imports that point up a layer (or across one): " + "; ".join(sorted(upward))


def test_no_import_cycle():
    g, state, stack, cycles = graph(), {}, [], []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for dep in sorted(g[m]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    pkg = tmp_path / "polymodal"
    (pkg / "nn").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nn" / "__init__.py").write_text("")
    (pkg / "config.py").write_text("from polymodal.nn import a\n")
    (pkg / "nn" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "nn" / "b.py").write_text("import polymodal.config\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    g = graph()
    assert g["polymodal.config"] == {"polymodal.nn.a"} and g["polymodal.nn.a"] == {"polymodal.nn.b"}
    for check in (test_every_import_points_down, test_no_import_cycle):
        try:
            check()
        except AssertionError as e:
            assert "polymodal.config -> polymodal.nn.a" in str(e)
        else:
            raise AssertionError(f"{check.__name__} passed on a bad graph")



def test_a_module_nobody_placed_is_reported(tmp_path, monkeypatch):
    pkg = tmp_path / "polymodal"
    (pkg / "nn").mkdir(parents=True)
    for name in ("__init__.py", "nn/__init__.py", "nn/a.py", "stray.py"):
        (pkg / name).write_text("")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    try:
        test_every_module_has_a_layer()
    except AssertionError as e:
        assert "['polymodal.stray']" in str(e)
    else:
        raise AssertionError("a module in no layer passed")


def test_model_files_read_in_one_sitting():
    files = [*(SRC / "polymodal" / "models").glob("*.py"), *(SRC / "polymodal" / "families").glob("*/model.py")]
    long = {str(p.relative_to(SRC)): n for p in files if (n := len(p.read_text().splitlines())) > 300}
    assert not long, f"model files over 300 lines: {long}"


def test_the_readmes_layout_names_every_module():
    """A module added outside a family folder is named in the README's Layout (family folders are listed by
    their folder, their files the same in each: config model format convert presets; hf_<name>.py as one)."""
    readme = (SRC.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("Imports point one way")]
    named = {word for line in layout.splitlines() for word in line.replace("(", " ").split()}
    missing = sorted(str(path.relative_to(SRC / "polymodal")) for path in (SRC / "polymodal").rglob("*.py")
                     if path.name != "__init__.py" and len(path.relative_to(SRC / "polymodal").parts) <= 2
                     and not path.name.startswith("hf_") and path.name not in named)
    assert not missing, f"modules the README's Layout does not name: {missing}"
