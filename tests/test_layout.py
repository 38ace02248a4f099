"""The package layout's import rule (docs/design.md): every import of every module, read with ast,
points down the layers; no module imports itself back through others."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ettin"

# What each layer may import (besides itself). Commands sit on top and may import anything.
COMMANDS = {"ettin.eval", "ettin.export", "ettin.compare", "ettin.launch", "ettin.train.cli",
            "ettin.train.__main__", "ettin.evaluation.cli", "ettin.report.cli", "ettin.cluster.launch",
            "ettin.suite"}
ALLOWED = {
    "cluster": {"train.config", "model", "store"},
    "bench": {"model", "objectives", "data", "optim", "parallel", "train", "store"},
    "report": {"evaluation", "train.config", "model", "objectives", "data", "optim", "store"},
    "evaluation": {"model", "objectives", "data", "store"},
    "train": {"train.config", "parallel", "optim", "objectives", "model", "data", "store"},
    "parallel": set(),
    "model": {"objectives", "data", "optim", "store"},
    "objectives": {"data"},
    "data": {"store"},
    "optim": set(),
    "store": set(),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def ettin_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ettin"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ettin")}
    return found


MODULES = {module_name(p): ettin_imports(p) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> str:
    """``train.config`` is a layer of its own (the schema report and cluster read); else the
    subpackage."""
    parts = module.split(".")
    if parts[1:3] == ["train", "config"]:
        return "train.config"
    return parts[1] if len(parts) > 1 else "ettin"


def test_every_import_points_down_the_layers():
    wrong = []
    for module, imports in MODULES.items():
        if module in COMMANDS or module == "ettin" or layer(module) not in ALLOWED:
            continue
        mine = layer(module)
        for target in imports:
            other = layer(target)
            if other in (mine, "ettin") or (mine == "train" and other == "train.config"):
                continue
            if other not in ALLOWED[mine] and not (other == "train.config" and "train" in ALLOWED[mine]):
                wrong.append(f"{module} imports {target} ({mine} may import {sorted(ALLOWED[mine])})")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_back():
    graph = defaultdict(set)
    for module, imports in MODULES.items():
        for target in imports:
            # "from ettin.a import b" may name the module ettin.a.b
            graph[module].add(target if target in MODULES else target.rsplit(".", 1)[0])
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, ()):
            if target == module or target not in MODULES:
                continue
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])


def test_every_package_says_what_it_owns_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc, f"{init} opens with no docstring saying what it may import"
