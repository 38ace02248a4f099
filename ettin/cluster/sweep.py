"""python -m ettin.train -m key=a,b other=c,d ...: one run per combination of the swept values
(Hydra's sweep syntax, parsed by Hydra), each a normal run directory under one sweep root, and
``sweep.csv`` at the root: member, overrides, status, final train and validation loss per phase.
Locally the members run one after another (one ``python -m ettin.train`` each, so a failing member
does not stop the others); with ``launcher=slurm`` they are one job array (``submit_sweep``), as a
suite's members are. Either way a finished member (the suite's rule: its last phase's phase-end
checkpoint) is skipped by the next run of the same command, and on Slurm so is a queued or running one.

    <output_dir>/<run_name>-sweep/
      <member>/            the run; named from the overrides that vary, e.g. lr-0.001_tokens-20000
                           (a value that loses characters in the name gets a short hash of itself:
                           tokenizer=/data/tok_a/v1 -> tokenizer-datatokav1-<6 hex>)
      <member>/sweep-member.json  the recipe and overrides the member was created for: a later run
                           of the sweep whose member would get others is refused, naming them
      logs/<member>.log    what its training printed (local); on Slurm <member>/slurm.log
      slurm/sweep/         the array's launch.sbatch and Slurm's own messages per task
      sweep.csv
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ettin.cluster.launch import array_spec, queue_states, recorded_job, submit
from ettin.cluster.suite_members import run_finished, run_state, run_training
from ettin.store.fs import write_text
from ettin.store.rundir import RunDir
from ettin.train.config import ConfigError, TrainConfig, compose

MEMBER_RECORD = "sweep-member.json"


@dataclass(frozen=True)
class SweepMember:
    name: str
    overrides: tuple[str, ...]  # the swept key=value pairs of this member


@dataclass(frozen=True)
class Sweep:
    root: Path
    recipe: str
    shared: tuple[str, ...]  # the overrides every member gets
    members: tuple[SweepMember, ...]

    def argv(self, member: SweepMember) -> list[str]:
        """What python -m ettin.train gets for the member."""
        return [f"recipe={self.recipe}", *self.shared, *member.overrides, f"output_dir={self.root}",
                f"run_name={member.name}"]

    def config(self, member: SweepMember) -> TrainConfig:
        return compose(self.recipe, self.argv(member)[1:])

    def log(self, member: SweepMember) -> Path:
        return self.root / "logs" / f"{member.name}.log"

    def record(self, member: SweepMember) -> dict:
        """What the member's directory is created for (``MEMBER_RECORD``)."""
        return {"recipe": self.recipe, "overrides": [*self.shared, *member.overrides]}

    def check_members(self) -> None:
        """Refuse a sweep whose member directory was created for another configuration."""
        for member in self.members:
            path = self.root / member.name / MEMBER_RECORD
            if not path.is_file():
                continue
            then, now = json.loads(path.read_text()), self.record(member)
            if then != now:
                gone = [o for o in then["overrides"] if o not in now["overrides"]]
                new = [o for o in now["overrides"] if o not in then["overrides"]]
                recipe = (f"recipe {then['recipe']} -> {now['recipe']}; "
                          if then["recipe"] != now["recipe"] else "")
                raise ConfigError(
                    f"sweep member {member.name} in {self.root} was created for other overrides "
                    f"({recipe}there: {' '.join(gone) or 'none'}; now: {' '.join(new) or 'none'}); "
                    "give the sweep another run_name or output_dir, or delete that member's folder")

    def write_record(self, member: SweepMember) -> None:
        write_text(self.root / member.name / MEMBER_RECORD, json.dumps(self.record(member)) + "\n")


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


def _short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=3).hexdigest()


def plan_sweep(recipe: str, overrides: Sequence[str]) -> Sweep:
    """The sweep's members under ``<output_dir>/<run_name>-sweep``; every combination composes
    before any trains (ConfigError or Hydra's error otherwise)."""
    members, shared = sweep_members(overrides)
    cfg = compose(recipe, shared)
    sweep = Sweep(Path(cfg.output_dir).resolve() / f"{cfg.run_name}-sweep", recipe, tuple(shared),
                  tuple(members))
    for member in members:
        sweep.config(member)
    sweep.check_members()
    return sweep


def member_name(combo: Sequence[str]) -> str:
    """``optim.lr=0.001 phases.pretrain.tokens=2e4`` -> ``lr-0.001_tokens-2e4`` (last key part); a
    value whose characters the name cannot hold gets a short hash of itself, so two values never
    share a name (``/data/tok_a/v1`` and ``/data/tok_av1``)."""
    parts = []
    for item in combo:
        key, value = item.split("=", 1)
        kept = re.sub(r'[^A-Za-z0-9.+-]', '', value)
        if kept != value:
            kept = f"{kept}-{_short_hash(value)}"
        parts.append(f"{key.lstrip('+~').split('.')[-1]}-{kept}")
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


def run_sweep(sweep: Sweep, python: str = sys.executable) -> Path:
    """Every unfinished member, one after another; returns sweep.csv."""
    statuses = {}
    for member in sweep.members:
        if run_finished(sweep.root / member.name, sweep.config(member)):
            statuses[member.name] = "done"
            continue
        sweep.write_record(member)
        code = run_training(sweep.argv(member), sweep.log(member), python)
        statuses[member.name] = "done" if code == 0 else f"failed (exit {code}; log {sweep.log(member)})"
    return write_table(sweep, statuses)


def submit_sweep(sweep: Sweep, slurm) -> tuple[list[str], Path]:
    """The members that are neither done nor queued nor running, as one job array (``slurm``:
    python -m ettin.launch's options); (the submitted job ids, sweep.csv with every member's state)."""
    queue = queue_states(sweep.root / m.name for m in sweep.members)
    todo = [m for m in sweep.members
            if run_state(sweep.root / m.name, sweep.config(m), queue) not in ("done", "queued", "running")]
    jobs = []
    for member in todo:
        sweep.write_record(member)
    if todo:
        spec = array_spec(sweep.root.name, sweep.root / "slurm" / "sweep", slurm,
                          [sweep.argv(m) for m in todo])
        jobs.append(submit(spec))
        queue = queue_states(sweep.root / m.name for m in sweep.members)
    statuses = {}
    for member in sweep.members:
        run_dir = sweep.root / member.name
        state = run_state(run_dir, sweep.config(member), queue)
        statuses[member.name] = (state if state == "done" else
                                 f"{state} (job {recorded_job(run_dir)}; log {RunDir(run_dir).slurm_log})")
    return jobs, write_table(sweep, statuses)


def write_table(sweep: Sweep, statuses: dict[str, str]) -> Path:
    """sweep.csv: each member's overrides, status and final losses."""
    rows = [{"member": m.name, "overrides": " ".join(m.overrides), "status": statuses[m.name],
             **final_losses(sweep.root / m.name)} for m in sweep.members]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(sweep.root / "sweep.csv", table.getvalue())  # a crash never leaves half a table
