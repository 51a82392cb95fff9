"""The package's import graph: layers point one way and no module imports itself back, function-level imports
included (an import inside a function still ties the two modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pvt_lightning"
LAYERS = {"errors": 0, "tags": 0, "models": 1, "data": 2, "runs": 3, "training": 4, "evaluation": 5, "export": 5,
          "serve": 5, "audit": 5, "cli": 6}
"""models <- data <- runs <- training <- evaluation / export / serve / audit <- cli (the root __init__ is the API)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every pvt_lightning module ``path`` imports, at any depth of its code."""
    found = set()
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if name.split(".")[0] in ("pvt_lightning", "timm", "tools")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {target for target in imports_of(path) if target in modules and target != name}
            for name, path in modules.items()} | {"__external__": {target for path in modules.values()
                                                                  for target in imports_of(path)
                                                                  if target.split(".")[0] != "pvt_lightning"}}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert packages <= set(LAYERS), f"give {sorted(packages - set(LAYERS))} a layer in LAYERS"


def test_no_import_points_up():
    edges = graph()
    upward = [f"{source} -> {target}" for source, targets in edges.items() for target in targets
              if layer(source) is not None and layer(target) is not None and layer(target) > layer(source)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    edges = {name: {t for t in targets if t != "__external__"} for name, targets in graph().items()}
    edges.pop("__external__")
    # package __init__ files re-export their own modules: an edge from a package to its child is not a cycle
    edges = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in edges.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_package_never_imports_timm_or_the_benchmark_tools():
    assert not graph()["__external__"], "pvt_lightning must not import timm or tools/ (test and benchmark only)"


@pytest.mark.parametrize("source", ["import pvt_lightning.models.pvt_v2", "from ..cli import main",
                                    "def f():\n    from pvt_lightning.cli.main import main"])
def test_the_walk_sees_every_import_form(tmp_path, source):
    module = tmp_path / "pvt_lightning" / "training" / "x.py"
    module.parent.mkdir(parents=True)
    module.write_text(source)
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "pvt_lightning"
    try:
        found = imports_of(module)
    finally:
        PACKAGE = saved
    assert found & {"pvt_lightning.models.pvt_v2", "pvt_lightning.cli.main", "pvt_lightning.cli"}
