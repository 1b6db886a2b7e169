"""Shared machinery reads a family's spec (`families.spec_of`) and the `LanguageModel` protocol, never a family:
the source of generation/, train/, serve/ and cli.py, read with `ast`, names no family class, imports no family
module, and probes no model or config for an attribute (`hasattr`/`getattr` on them, `isinstance(..., *Config)`).

The media encoders (ViT, audio, VQ) are shared layers below the families (DESIGN.md), so naming them is allowed."""

from __future__ import annotations

import ast
from pathlib import Path

from polymodal.families import FAMILIES

SRC = Path(__file__).resolve().parents[1] / "src" / "polymodal"
SHARED = [*sorted((SRC / "generation").rglob("*.py")), *sorted((SRC / "train").rglob("*.py")),
          *sorted((SRC / "serve").rglob("*.py")), SRC / "cli.py"]
FAMILY_NAMES = {cls.__name__ for spec in FAMILIES.values() if not spec.model.__module__.startswith("polymodal.encoders")
                for cls in (spec.config, spec.model)}
PROBED = ("model", "config")  # what a probe's first argument is named after


def family_module(module: str) -> bool:
    """A module that holds family code: the model modules, the family configs, a family's own folder (the
    registries, `polymodal.models`, `polymodal.families` and its modules beside the folders, are not)."""
    parts = module.split(".")
    return (module.startswith(("polymodal.models.", "polymodal.fusion.configs"))
            or (parts[:2] == ["polymodal", "families"] and len(parts) > 2 and (SRC / "families" / parts[2]).is_dir()))


def findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    where = lambda node: f"{path.name}:{node.lineno}"  # noqa: E731
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in FAMILY_NAMES:
            out.append(f"{where(node)} names {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in FAMILY_NAMES:
            out.append(f"{where(node)} names {node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module and family_module(node.module):
            out.append(f"{where(node)} imports {node.module}")
        elif isinstance(node, ast.Import):
            out += [f"{where(node)} imports {a.name}" for a in node.names if family_module(a.name)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
            first = ast.unparse(node.args[0]).lower()
            if node.func.id in ("hasattr", "getattr") and any(p in first for p in PROBED):
                out.append(f"{where(node)} probes {ast.unparse(node)}")
            if node.func.id == "isinstance" and len(node.args) == 2 and ast.unparse(node.args[1]).endswith("Config"):
                out.append(f"{where(node)} probes {ast.unparse(node)}")
    return out


def test_shared_machinery_names_no_family_and_probes_no_model():
    assert FAMILY_NAMES >= {"PaliGemma", "PaliGemmaConfig", "DualEncoder", "Decoder"}  # the scan looks for them
    found = [f for path in SHARED for f in findings(path)]
    assert not found, "shared machinery that knows a family: " + "; ".join(found)


def test_the_scan_finds_what_it_forbids(tmp_path):
    """Each kind of finding on a small file, so the test above cannot pass by looking at nothing."""
    probe = tmp_path / "probe.py"
    probe.write_text("from polymodal.models.paligemma import PaliGemma\n"
                     "import polymodal.fusion.configs\n"
                     "def f(model, config):\n"
                     "    a = hasattr(model, 'trainable')\n"
                     "    b = getattr(model.config, 'vocab_size', None)\n"
                     "    c = isinstance(config, ContrastiveConfig)\n"
                     "    return PaliGemma, x.DualEncoder\n")  # ContrastiveConfig is named too
    found = findings(probe)
    kinds = [f.split(" ", 1)[1].split(" ", 1)[0] for f in found]
    assert kinds.count("imports") == 2 and kinds.count("probes") == 3 and kinds.count("names") == 3, found
