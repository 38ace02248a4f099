"""python -m ettin.train -m key=a,b other=c,d ...: one run per combination of the swept values
(Hydra's sweep syntax, parsed by Hydra), each a normal run directory under one sweep root, run one
after another (one ``python -m ettin.train`` each, so a failing member does not stop the others), and
``sweep.csv`` at the root: member, overrides, status, final train and validation loss per phase.

    <output_dir>/<run_name>-sweep/
      <member>/            the run; named from the overrides that vary, e.g. lr-0.001_tokens-20000
      logs/<member>.log    what its training printed
      sweep.csv
"""

from __future__ import annotations

import csv
import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ettin.cluster.suite import run_training
from ettin.store.rundir import RunDir


@dataclass(frozen=True)
class SweepMember:
    name: str
    overrides: tuple[str, ...]  # the swept key=value pairs of this member


def is_multirun(argv: Sequence[str]) -> bool:
    return "-m" in argv or "--multirun" in argv


def sweep_members(overrides: Sequence[str]) -> tuple[list[SweepMember], list[str]]:
    """(one member per combination of the swept values, the overrides every member shares)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes, shared = [], []
    for text, parsed in zip(overrides, OverridesParser.create().parse_overrides(list(overrides))):
        if parsed.is_sweep_override():
            key = parsed.get_key_element()
            axes.append([f"{key}={value}" for value in parsed.sweep_string_iterator()])
        else:
            shared.append(text)
    members = [SweepMember(member_name(combo), combo) for combo in itertools.product(*axes)]
    return members, shared


def member_name(combo: Sequence[str]) -> str:
    """``optim.lr=0.001 phases.pretrain.tokens=2e4`` -> ``lr-0.001_tokens-2e4`` (last key part)."""
    parts = []
    for item in combo:
        key, value = item.split("=", 1)
        parts.append(f"{key.lstrip('+~').split('.')[-1]}-{re.sub(r'[^A-Za-z0-9.+-]', '', value)}")
    return "_".join(parts) or "run"


def final_losses(run_dir: Path) -> dict[str, str]:
    """The last train and validation loss of each phase the run logged."""
    losses = {}
    for path in RunDir(run_dir).metrics_files():
        with path.open() as f:
            rows = list(csv.DictReader(f))
        phase = path.parent.name
        for column, label in (("train/loss", "train"), ("val/loss", "val")):
            values = [r[column] for r in rows if r.get(column)]
            losses[f"{phase} {label} loss"] = f"{float(values[-1]):.4f}" if values else ""
    return losses


def run_sweep(root: Path, members: Sequence[SweepMember], shared: Sequence[str],
              python: str = sys.executable) -> Path:
    """Every member, one after another; returns sweep.csv."""
    rows = []
    for member in members:
        log = root / "logs" / f"{member.name}.log"
        argv = [*shared, *member.overrides, f"output_dir={root}", f"run_name={member.name}"]
        code = run_training(argv, log, python)
        rows.append({"member": member.name, "overrides": " ".join(member.overrides),
                     "status": "done" if code == 0 else f"failed (exit {code}; log {log})",
                     **final_losses(root / member.name)})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (root / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return root / "sweep.csv"
