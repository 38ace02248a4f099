"""The configuration's trip through the code (issue 25): every function that takes the whole training config
(a parameter typed ``TrainConfig``, or named ``cfg`` and not typed as another config), every lookup ``cfg.phases[...]`` and every
re-resolution of a phase's objective (``phase_mix`` / ``phase_objective`` calls), per file.

    python benchmarks/config_trip.py [ettin]
"""

import ast
import sys
from collections import Counter
from pathlib import Path


def config_args(fn: ast.FunctionDef) -> list[str]:
    """The names of ``fn``'s parameters that hold the training config (``cfg`` unless typed as another
    config, e.g. data preparation's ``PrepareConfig``; or anything typed ``TrainConfig``)."""
    found = []
    for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs:
        kind = ast.unparse(a.annotation) if a.annotation is not None else ""
        if "TrainConfig" in kind or (a.arg == "cfg" and "Config" not in kind):
            found.append(a.arg)
    return found


def takes_phase_too(fn: ast.FunctionDef) -> bool:
    return any(a.arg == "phase" for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs)


def count(root: Path) -> dict[str, Counter]:
    totals = {"functions taking the config": Counter(), "... of them with a phase name, (cfg, phase)": Counter(),
              "cfg.phases[...] lookups": Counter(), "objective re-resolutions": Counter()}
    for path in sorted(root.rglob("*.py")):
        name = str(path.relative_to(root.parent))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and config_args(node):
                totals["functions taking the config"][name] += 1
                if takes_phase_too(node):
                    totals["... of them with a phase name, (cfg, phase)"][name] += 1
            elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
                  and node.value.attr == "phases"):
                totals["cfg.phases[...] lookups"][name] += 1
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("phase_mix", "phase_objective")):
                totals["objective re-resolutions"][name] += 1
    return totals


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "ettin").resolve()
    for what, per_file in count(root).items():
        print(f"{what}: {sum(per_file.values())}")
        for name, n in per_file.most_common():
            print(f"  {n:3d}  {name}")
