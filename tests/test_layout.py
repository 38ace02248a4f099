"""The package layout's import rule (docs/design.md): every import of every module, read with ast,
points down the layers; no module imports itself back through others."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ettin"

# What each layer may import (besides itself). Commands sit on top and may import anything.
COMMANDS = {"ettin.eval", "ettin.export", "ettin.merge", "ettin.compare", "ettin.launch", "ettin.train_command",
            "ettin.train.__main__", "ettin.evaluation.cli", "ettin.cluster.launch", "ettin.suite", "ettin.generate"}
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


NAMES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def ettin_imports(source: str, module: str, is_package: bool) -> set[str]:
    """The ettin modules the code of ``module`` imports (``from ettin.a import b`` imports ettin.a.b
    when that is a module, else ettin.a); a relative import (``from ..a import b``) is read as the
    absolute one it stands for, so it obeys the same rule."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # one dot: this package; each further dot one package up
                target = ".".join(package[: len(package) - node.level + 1] + ([target] if target else []))
            if not target.startswith("ettin"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in NAMES else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ettin")}
    return found


MODULES = {module_name(p): ettin_imports(p.read_text(), module_name(p), p.name == "__init__.py")
           for p in PACKAGE.rglob("*.py")}


def test_relative_imports_are_read_as_the_absolute_imports_they_stand_for():
    assert ettin_imports("from ..train import run", "ettin.model.x", False) == {"ettin.train.run"}
    assert ettin_imports("from . import flops", "ettin.model.x", False) == {"ettin.model.flops"}
    assert ettin_imports("from .collate import MLMCollator", "ettin.objectives", True) == {"ettin.objectives.collate"}


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
            graph[module].add(target)
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


def test_the_package_ships_every_recipe_config_and_template():
    """``pip install .`` (not editable) finds its recipes: every file the commands read from inside the
    package is matched by pyproject's package-data, and the repository's conf/, recipes/ and slurm/
    show those same files."""
    import fnmatch
    import tomllib

    def shipped(path: str, pattern: str) -> bool:  # setuptools' glob: "*" stays within one folder
        parts, wanted = path.split("/"), pattern.split("/")
        return len(parts) == len(wanted) and all(map(fnmatch.fnmatchcase, parts, wanted))

    root = PACKAGE.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ettin"]
    needed = [*PACKAGE.glob("conf/**/*.yaml"), *PACKAGE.glob("recipes/*.yaml"), PACKAGE / "cluster" / "ettin.sbatch"]
    assert len(needed) > 30
    unshipped = [str(p.relative_to(PACKAGE)) for p in needed
                 if not any(shipped(str(p.relative_to(PACKAGE)), pattern) for pattern in patterns)]
    assert not unshipped, f"not in [tool.setuptools.package-data]: {unshipped}"
    for link, target in (("conf", PACKAGE / "conf"), ("recipes", PACKAGE / "recipes"),
                         ("slurm/ettin.sbatch", PACKAGE / "cluster" / "ettin.sbatch")):
        assert (root / link).resolve() == target.resolve(), link


COMMANDS_BY_NAME = ["ettin.train", "ettin.eval", "ettin.compare", "ettin.export", "ettin.launch",
                    "ettin.bench", "ettin.data.prepare", "ettin.data.index"]


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS_BY_NAME)
def test_every_command_keeps_its_name(command, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"python -m {command}" in done.stdout


# File names two modules share, each with the one meaning both have.
SHARED_NAMES = {
    "config": "a package's own typed config (model.config: the architecture; train.config: a run)",
    "memory": "training memory (model.memory counts it; bench.memory is its bench subcommand)",
    "export": "python -m ettin.export: the entry point and the command it runs",
    "merge": "python -m ettin.merge: the entry point and the command it runs",
    "launch": "python -m ettin.launch: the entry point and the command it runs",
}


def test_one_meaning_per_module_name():
    """A file name names one thing: no two ``suite.py`` with different meanings, ``cli.py`` only as
    the command of its own package (one that imports nothing above it); a name shared by two modules
    is listed with the meaning both carry."""
    by_name = defaultdict(list)
    for module in MODULES:
        name = module.split(".")[-1]
        if name not in ("ettin", "__main__") and module.count(".") >= 1 and module not in {
                m for m in MODULES if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}:
            by_name[name].append(module)
    shared = {name: sorted(modules) for name, modules in by_name.items() if len(modules) > 1}
    assert set(shared) == set(SHARED_NAMES), shared
    for module in by_name.get("cli", []):
        mine = layer(module)
        above = {layer(t) for t in MODULES[module]} - {mine, "ettin", "train.config"} - ALLOWED[mine]
        assert not above, f"{module} is a command that drives {sorted(above)}: it belongs above them"
