"""The layering of engine/: every import (module-level, inside functions, under TYPE_CHECKING)
goes down the layer picture of docs/architecture.md, never up, never sideways between peers,
and never round a circle."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. Packages on one level are peers: neither may import the other.
LAYERS: list[tuple[str, ...]] = [
    ("engine.core",),
    ("engine.data",),
    ("engine.spec",),
    ("engine.models",),
    ("engine.store",),
    ("engine.lib",),
    ("stages",),
    ("engine.load", "engine.run"),
    ("engine.report",),
    ("engine.cli",),
]
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted([*ROOT.glob("engine/**/*.py"), *ROOT.glob("stages/*.py")]):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every engine/stages module `name` imports, wherever the import statement sits."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer(name: str) -> int:
    for i, group in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in group):
            return i
    if name == "engine":
        return 0  # the package itself holds only __version__
    raise AssertionError(f"{name} is in no layer: add its package to LAYERS and docs/architecture.md")


def package(name: str) -> str:
    for group in LAYERS:
        for p in group:
            if name == p or name.startswith(p + "."):
                return p
    return name


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_imports_go_down_the_layers():
    wrong = []
    for name, targets in graph().items():
        for target in sorted(targets):
            if layer(target) > layer(name):
                wrong.append(f"{name} imports {target} (up: {package(name)} is below {package(target)})")
            elif layer(target) == layer(name) and package(target) != package(name):
                wrong.append(f"{name} imports {target} (sideways: {package(name)} and {package(target)} are peers)")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    try:
        graphlib.TopologicalSorter(graph()).prepare()
    except graphlib.CycleError as exc:
        raise AssertionError(f"import circle: {' -> '.join(exc.args[1])}") from None


def test_engine_holds_packages_and_small_modules():
    top = sorted(p.name for p in (ROOT / "engine").iterdir() if p.suffix == ".py")
    assert top == ["__init__.py"], top  # everything else lives in a package (engine/cli/ included)
    long = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for name, p in modules().items()
        if name.startswith("engine") and (n := len(p.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, "\n".join(long)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from .graph import edges\n    import engine.core.io\n")
    known = {"engine.spec.m": path, "engine.spec.graph": path, "engine.core.io": path}
    assert imports("engine.spec.m", path, known) == {"engine.spec.graph", "engine.core.io"}
