"""The package's dependencies run one way: each subpackage imports only its own layer and the ones below.

    .venv/bin/pytest tests/unit/test_layers.py

Layers, lowest first (a module may import its own subpackage and any lower layer, never a higher one):
base modules (errors, faults, deadlines, hub, checksums) < algorithms (pure torch) < config < data < models < rollout <
workers (code inside Ray actors) < evaluation < rundir < controller < analysis < study < cli. So nothing
below analysis/ and study/ imports them, and algorithms/ imports nothing of the package but the base.
Every import counts, at module level or inside a function, type-only ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tspin_ray"
LAYERS = (("errors", "faults", "deadlines", "hub", "checksums"), ("algorithms",), ("config",), ("data",), ("models",), ("rollout",),
          ("workers",), ("evaluation",), ("rundir",), ("controller",), ("analysis",), ("study",),
          ("cli", "__main__", "__init__"))
# Function-level imports of the package: only the CLI dispatcher, so `tspin-ray config` or `report` do not
# import torch, Ray and vLLM's stack for commands that never use them.
LAZY_ALLOWED = {"tspin_ray.cli"}


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{module}: in no layer; add its subpackage to LAYERS")


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module of the package, line, at module level) for every import in `path`."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tspin_ray":
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            targets = subs or [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "tspin_ray"]
        else:
            continue
        found += [(t, node.lineno, id(node) in top) for t in targets]
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    known = modules()
    return {m: imports(f, known) for m, f in known.items()}


def test_every_import_runs_down_the_layers():
    upward = [f"{m}:{line} imports {t} (layer {layer_of(t)} > {layer_of(m)})"
              for m, deps in graph().items() for t, line, _ in deps if layer_of(t) > layer_of(m)]
    assert upward == []


def test_no_import_cycles():
    deps = {m: {t for t, _, _ in ds if t != m and t in modules()} for m, ds in graph().items()}
    cycles, seen = [], set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            cycles.append(path[path.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        for d in sorted(deps[m]):
            visit(d, path + [m])

    for m in sorted(deps):
        visit(m, [])
    assert cycles == []


def test_package_imports_are_at_module_level():
    lazy = [f"{m}:{line} imports {t} inside a function" for m, ds in graph().items() if m not in LAZY_ALLOWED
            for t, line, top in ds if not top]
    assert lazy == []


@pytest.mark.parametrize("source,message", [
    ("from tspin_ray.controller.driver import train\n", "tspin_ray.algorithms.bad:1 imports tspin_ray.controller.driver"),
    ("def f():\n    from tspin_ray.study import plan\n", "tspin_ray.algorithms.bad:2 imports tspin_ray.study.plan"),
])
def test_the_check_sees_an_upward_import(tmp_path, source, message):
    f = tmp_path / "bad.py"
    f.write_text(source)
    known = {**modules(), "tspin_ray.algorithms.bad": f}
    upward = [f"tspin_ray.algorithms.bad:{line} imports {t}" for t, line, _ in imports(f, known)
              if layer_of(t) > layer_of("tspin_ray.algorithms.bad")]
    assert upward == [message]
