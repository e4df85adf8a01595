"""docs/architecture.md's layering, checked on the tree: every import of a deepvis package goes to a lower
row of the diagram, or along one of the arrows drawn inside a row (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "deepvis"

#: the diagram's rows, bottom first
ROWS = [
    {"errors", "choices", "pixels", "runtime", "allocator", "_fs", "_progress", "_version", "display"},
    {"models", "io"},
    {"capture", "datasets", "render", "predictions"},
    {"stats", "optimize", "backprop", "activations"},
    {"analysis", "atlas", "scores"},
    {"cli", "server", "notebook"},
]
#: the arrows inside a row
SIDEWAYS = {("analysis", "atlas"), ("scores", "atlas"), ("cli", "server"), ("notebook", "server")}
#: entry points that may import anything they re-export or run
TOP = {"__init__", "__main__"}


def _unit(path: Path) -> str:
    return path.relative_to(ROOT).with_suffix("").parts[0]


def _is_module(name: str) -> bool:
    return (ROOT / name).is_dir() or (ROOT / f"{name}.py").exists()


def _imports(path: Path) -> set[str]:
    pkg = list(path.relative_to(ROOT).parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "deepvis" and len(parts) > 1:
                    found.add(parts[1])
            else:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                full = base + ((node.module or "").split(".") if node.module else [])
                # `from .. import x`: x is a sub-module, or a name of the package root
                found |= {full[0]} if full else {a.name if _is_module(a.name) else "__init__" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("deepvis.")}
    return found


def _row(unit: str) -> int:
    for i, row in enumerate(ROWS):
        if unit in row:
            return i
    raise AssertionError(f"deepvis.{unit} is not in docs/architecture.md's diagram: add it to its row")


def test_every_import_points_down_the_diagram():
    wrong = []
    for path in ROOT.rglob("*.py"):
        src = _unit(path)
        if src in TOP:
            continue
        for dst in _imports(path) - {src} - TOP:
            bottom = _row(src) == _row(dst) == 0  # the bottom row's modules may use each other
            if _row(dst) >= _row(src) and (src, dst) not in SIDEWAYS and not bottom:
                wrong.append(f"{path.relative_to(ROOT)} imports deepvis.{dst}")
    assert not wrong, "imports against docs/architecture.md's arrows:\n" + "\n".join(sorted(wrong))


def test_the_library_never_imports_the_cli_or_the_server():
    for path in ROOT.rglob("*.py"):
        unit = _unit(path)
        if unit not in ("cli", "server", "notebook", "__main__"):
            # the package root re-exports deepvis.show / layers / toolbox (imported on first use)
            layers_above = {"cli", "server"} if unit == "__init__" else {"cli", "server", "notebook"}
            assert not _imports(path) & layers_above, path
