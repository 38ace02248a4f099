"""A run directory as data (``load_run``: its config, every row of ``logs/<phase>/metrics.csv`` on one
cumulative token axis, each phase offset by the final tokens of the phases before it, and its
checkpoints), and one run's checkpoints and export for notebooks/checkpoint_analysis.ipynb
(``checkpoint_table / weight_norms / checkpoint_losses / attention_layout / export_parity``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ettin.store.rundir import RunDir


RUN_LAYOUT = ("config.yaml, logs/<phase>/metrics.csv and checkpoints/<phase>-step...-tok.../ (what "
              "python -m ettin.train writes to <output_dir>/<run_name>)")


class RunError(ValueError):
    """A path that is not a usable run directory (or eval.json); the message says what was expected."""


# ------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Checkpoint:
    path: Path
    meta: dict
    total_tokens: int  # on the run's cumulative token axis

    @property
    def phase(self) -> str:
        return self.meta["phase"]

    @property
    def tokens(self) -> int:
        return int(self.meta["tokens"])

    @property
    def step(self) -> int:
        return int(self.meta["step"])


@dataclass
class Run:
    path: Path
    config: dict  # config.yaml as plain data
    phases: list[str]  # in training order
    metrics: pd.DataFrame  # every CSV row: phase, step, tokens (in the phase), total_tokens, metrics
    checkpoints: list[Checkpoint]
    phase_tokens: dict[str, int]  # tokens trained per phase (final checkpoint, else last logged row)
    offsets: dict[str, int] = field(default_factory=dict)  # cumulative tokens before each phase

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def objective(self) -> str:
        return str(self.config.get("objective"))

    def plan(self, phase: str) -> Optional[dict]:
        """The phase's plan as training resolved it (ettin.train.plan: the ``plan`` of its phase-end
        checkpoint's meta, else of its latest); None for runs written before plans were recorded."""
        end = self.phase_end(phase)
        return end.meta.get("plan") if end is not None else None

    def phase_mix(self, phase: str):
        """The ObjectiveMix ``phase`` trained: from its recorded plan, else resolved from config.yaml
        (its own objective or mix, else the run's); None when it names objectives this ettin does
        not know."""
        from ettin.objectives import MixError, ObjectiveMix, resolve_mix

        plan = self.plan(phase)
        p = self.config.get("phases", {}).get(phase) or {}
        try:
            if plan is not None:
                mix = plan["objective_mix"]
                return ObjectiveMix.of({m["objective"]: m["weight"] for m in mix["members"]}, mix["export_as"])
            return resolve_mix(p.get("objective_mix"), p.get("objective"), self.config.get("objective_mix"),
                               self.objective, self.config.get("export_as"))
        except MixError:
            return None

    def phase_objective(self, phase: str) -> str:
        """What ``phase`` trained: its objective (``mlm``) or mix (``mlm:15+clm:1``)."""
        mix = self.phase_mix(phase)
        return mix.name if mix is not None else \
            str((self.config.get("phases", {}).get(phase) or {}).get("objective") or self.objective)

    @property
    def kind(self) -> str:
        # What the run's final model is: its last phase's objective (or mix's export side) decides.
        mix = self.phase_mix(self.phases[-1]) if self.phases else None
        if mix is None:
            from ettin.objectives import OBJECTIVES

            objective = OBJECTIVES.get(self.objective)
            return "decoder" if objective is not None and objective.causal else "encoder"
        # A model of an attention pattern no export class has (prefix) is named by its pattern.
        return mix.side or f"{mix.objective.attention.value}-attention model"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.objective.upper()} {self.kind})"

    def phase_end(self, phase: str) -> Optional[Checkpoint]:
        """The checkpoint that ended ``phase`` (else its latest one), or None."""
        mine = [c for c in self.checkpoints if c.phase == phase]
        ends = [c for c in mine if c.meta.get("phase_end")]
        return (ends or mine or [None])[-1]

    def phase_config(self, phase: str):
        """The ``PhaseConfig`` of ``phase`` from its recorded plan, else from config.yaml. Only the
        phase's keys are read, so a run written by another version of ettin (other top-level keys)
        still replays."""
        from dataclasses import fields

        from ettin.train.config import PhaseConfig

        raw = recorded_phase_config(self, phase)
        if raw is None:
            raise RunError(f"{self.path / 'config.yaml'} has no phases.{phase}")
        known = {f.name for f in fields(PhaseConfig)}
        return PhaseConfig(**{k: v for k, v in raw.items() if k in known})

    def curve(self, column: str) -> pd.DataFrame:
        """Rows that hold ``column``: phase, total_tokens and the value, in order."""
        if column not in self.metrics:
            return pd.DataFrame(columns=["phase", "total_tokens", column])
        rows = self.metrics[self.metrics[column].notna()]
        return rows[["phase", "total_tokens", column]]


def load_run(path: Path | str) -> Run:
    """Read a run directory; a path that is not one fails naming the path and what was expected."""
    from omegaconf import OmegaConf

    from ettin.store.checkpoints import read_meta

    path = Path(path)
    if not path.is_dir():
        state = "does not exist" if not path.exists() else "is a file, not a folder"
        raise RunError(f"{path} is not an ettin run directory: it {state}; expected a folder with "
                       f"{RUN_LAYOUT}")
    config_file = RunDir(path).config
    if not config_file.is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise RunError(f"{path} is not an ettin run directory: it has no config.yaml (it holds "
                       f"{found}); expected {RUN_LAYOUT}")
    config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    if not isinstance(config, dict):
        raise RunError(f"{config_file} is not a training config (a mapping of keys)")
    phases = [config["phase"]] if config.get("phase") else list(config.get("phase_order") or [])
    if not phases:
        raise RunError(f"{config_file} lists no phases (phase_order is empty)")
    metas = [(p, read_meta(p)) for p in RunDir(path).list_checkpoints()]
    tables = {phase: _read_metrics(RunDir(path).metrics(phase)) for phase in phases}
    phase_tokens, offsets, total = {}, {}, 0
    for phase in phases:
        ends = [m for _, m in metas if m.get("phase") == phase]
        logged = tables[phase]["tokens"].max() if len(tables[phase]) else 0
        phase_tokens[phase] = int(ends[-1]["tokens"]) if ends else int(0 if pd.isna(logged) else logged)
        offsets[phase] = total
        total += phase_tokens[phase]
    frames = []
    for phase in phases:
        table = tables[phase]
        known = {int(m["step"]): int(m["tokens"]) for _, m in metas if m.get("phase") == phase}
        table["tokens"] = _fill_tokens(table, known)
        table["total_tokens"] = table["tokens"] + offsets[phase]
        frames.append(table)
    metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    checkpoints = [Checkpoint(p, m, offsets.get(m.get("phase"), 0) + int(m["tokens"]))
                   for p, m in metas if m.get("phase") in offsets]
    return Run(path, config, phases, metrics, checkpoints, phase_tokens, offsets)


def _read_metrics(csv_file: Path) -> pd.DataFrame:
    """One phase's metrics.csv with a ``phase`` column and ``tokens`` where the row says it."""
    phase = csv_file.parent.name
    if not csv_file.is_file():
        return pd.DataFrame({"phase": pd.Series(dtype=str), "step": pd.Series(dtype=float),
                             "tokens": pd.Series(dtype=float)})
    table = pd.read_csv(csv_file)
    table.insert(0, "phase", phase)
    if "step" not in table:
        table["step"] = np.nan
    train = [c for c in table if c.startswith(("train/", "perf/"))]
    if "train/tokens" in table:
        # A row that repeats the previous train row's token clock repeats stale train values.
        tokens = table["train/tokens"]
        stale = tokens.notna() & tokens.duplicated()
        table.loc[stale, train] = np.nan
    tokens = table["train/tokens"] if "train/tokens" in table else pd.Series(np.nan, index=table.index)
    if "val/tokens" in table:
        tokens = tokens.fillna(table["val/tokens"])
    table["tokens"] = tokens
    measured = [c for c in table if c.startswith(("train/", "perf/", "val/"))]
    return table[table[measured].notna().any(axis=1)].reset_index(drop=True) if measured else table


def _fill_tokens(table: pd.DataFrame, known: dict[int, int]) -> pd.Series:
    """Tokens of rows that do not say them, from their step: the step's train row or checkpoint,
    else linear between the known steps (rows are logged at a step; the clock is per step)."""
    tokens = table["tokens"].astype(float)
    points = dict(known)
    for step, value in zip(table["step"], tokens):
        if not (pd.isna(step) or pd.isna(value)):
            points[int(step)] = int(value)
    if tokens.notna().all() or not points:
        return tokens
    steps = np.array(sorted(points), dtype=float)
    values = np.array([points[int(s)] for s in steps], dtype=float)
    guess = np.interp(table["step"].astype(float), steps, values)
    return tokens.fillna(pd.Series(guess, index=table.index)).round()


# ------------------------------------------------------------------------------------------------
# Figures




def checkpoint_table(run: Run) -> pd.DataFrame:
    return pd.DataFrame([{"checkpoint": c.path.name, "phase": c.phase, "step": c.step,
                          "tokens": c.tokens, "total_tokens": c.total_tokens,
                          "phase_end": bool(c.meta.get("phase_end"))} for c in run.checkpoints])


# Each weight in the first group whose marker its name contains (norms before their modules).
WEIGHT_GROUPS = {"norms": ("norm.",), "embeddings": ("embeddings.",), "attention": (".attn.",),
                 "mlp": (".mlp.",), "head": ("head.", "decoder.bias")}


def weight_group(name: str) -> Optional[str]:
    return next((g for g, markers in WEIGHT_GROUPS.items() if any(m in name for m in markers)), None)


def weight_norms(run: Run) -> pd.DataFrame:
    """The L2 norm of each group of weights (norms, embeddings, attention, MLP, head), per checkpoint
    (the tied vocabulary projection counted once, as the embeddings)."""
    from ettin.store.checkpoints import TIED, load_weights

    rows = []
    for checkpoint in run.checkpoints:
        squares = dict.fromkeys(WEIGHT_GROUPS, 0.0)
        for name, tensor in load_weights(checkpoint.path).items():
            group = weight_group(name)
            if name != TIED[1] and group is not None:
                squares[group] += float(tensor.double().pow(2).sum())
        rows.append({"checkpoint": checkpoint.path.name, "total_tokens": checkpoint.total_tokens,
                     **{g: math.sqrt(v) for g, v in squares.items()}})
    return pd.DataFrame(rows)


def checkpoint_losses(run: Run, *, max_samples: int = 32) -> pd.DataFrame:
    """Each checkpoint's loss on one fixed set of validation samples (the last phase's data and
    sequence length and objective, the run's validation mask rate), so checkpoints compare."""
    import torch

    from ettin.data.loader import validation_batches
    from ettin.data.tokenizer import load_tokenizer
    from ettin.model.export import load_checkpoint_model
    from ettin.objectives import OBJECTIVES

    if not run.checkpoints:
        raise RunError(f"{run.path} has no complete checkpoint")
    phase = run.phases[-1]
    p = run.phase_config(phase)
    sources = data_sources(run, phase)
    tokenizer = load_tokenizer(run.checkpoints[-1].meta["tokenizer"])
    plan = run.plan(phase)
    mask_rate = float(plan["val_mask_rate"] if plan is not None
                      else (run.config.get("trainer") or {}).get("val_mask_rate", 0.15))
    # A mix's model is scored as what it is (its export side's objective).
    mix = run.phase_mix(phase)
    objective = mix.objective if mix is not None else OBJECTIVES[run.phase_objective(phase)]
    collator = objective.collator(tokenizer, mask_rate=mask_rate, seed=int(recorded_seed(run)))
    batches = validation_batches([(s["path"], s["weight"]) for s in sources], seq_len=p.seq_len,
                                 collator=collator, batch_size=p.micro_batch, max_samples=max_samples)
    rows = []
    for checkpoint in run.checkpoints:
        model, _ = load_checkpoint_model(checkpoint.path)
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                total += float(model(**batch, loss_reduction="sum").loss)
                count += int((batch["labels"] != -100).sum())
        rows.append({"checkpoint": checkpoint.path.name, "phase": checkpoint.phase,
                     "total_tokens": checkpoint.total_tokens, "loss": total / max(count, 1)})
    return pd.DataFrame(rows)


def attention_layout(run: Run, export: Optional[Path | str] = None) -> pd.DataFrame:
    """Per layer: attention kind, window and RoPE theta in our final checkpoint, and as the installed
    transformers reads the export's config.json (``ettin.model.hub.from_hf_config``)."""
    from ettin.model.config import ModelConfig
    from ettin.model.hub import from_hf_config

    if not run.checkpoints:
        raise RunError(f"{run.path} has no complete checkpoint")
    ours = ModelConfig(**run.checkpoints[-1].meta["model_config"])
    folder = Path(export) if export is not None else RunDir(run.path).export()
    theirs = from_hf_config(json.loads((folder / "config.json").read_text()))[0] \
        if (folder / "config.json").is_file() else None
    rows = []
    for layer in range(ours.num_hidden_layers):
        row = {"layer": layer}
        for prefix, config in (("ours", ours), ("export", theirs)):
            if config is None:
                row.update({f"{prefix} attention": "no export", f"{prefix} window": None,
                            f"{prefix} rope theta": None})
                continue
            is_global = config.is_global_layer(layer)
            row[f"{prefix} attention"] = "global" if is_global else "sliding"
            row[f"{prefix} window"] = None if is_global else config.window
            row[f"{prefix} rope theta"] = config.global_rope_theta if is_global else config.local_rope_theta
        rows.append(row)
    return pd.DataFrame(rows)


def export_parity(run: Run, export: Optional[Path | str] = None) -> float:
    """Max |logit difference| between transformers' reload of the export (AutoModelForMaskedLM or
    AutoModelForCausalLM) and our model from the final checkpoint; raises if beyond tolerance."""
    import torch
    from transformers import AutoTokenizer

    from ettin.model.export import check_parity, load_checkpoint_model

    if not run.checkpoints:
        raise RunError(f"{run.path} has no complete checkpoint")
    folder = Path(export) if export is not None else RunDir(run.path).export()
    if not (folder / "config.json").is_file():
        raise RunError(f"{folder} is not an export (no config.json); write one with "
                       f"python -m ettin.export {run.path} {folder}")
    model, _ = load_checkpoint_model(run.checkpoints[-1].path)
    return check_parity(folder, model, AutoTokenizer.from_pretrained(str(folder)), torch.float32)


def recorded_data(run: Run, phase: str) -> Optional[dict]:
    """The ``data`` entry of the phase's final checkpoint meta (recorded by newer runs)."""
    end = run.phase_end(phase)
    return end.meta.get("data") if end is not None else None


def data_sources(run: Run, phase: str) -> Optional[list[dict]]:
    """(path, weight, fingerprint) of each source of a phase: recorded in the checkpoint meta when
    the run recorded it, else from config.yaml (``builtin`` is data_dir/builtin-<seq_len>, as
    ettin.train.run resolves it) with the fingerprint computed now from the folder's summary.json."""
    recorded = recorded_data(run, phase)
    if recorded and recorded.get("sources") is not None:
        return [{**s, "path": str(s.get("path")), "weight": float(s.get("weight", 1.0)),
                 "format": s.get("format", "prepared"), "recorded": True} for s in recorded["sources"]]
    from ettin.data.corpus import builtin_data_path
    from ettin.data.formats import prepared_fingerprint

    sources = (run.config.get("data") or {}).get(phase)
    phase_cfg = recorded_phase_config(run, phase)
    if not sources or phase_cfg is None:
        return None
    out = []
    for source in sources:
        path = str(source.get("path"))
        if path == "builtin":
            path = str(builtin_data_path(run.config.get("data_dir", "data"), phase_cfg["seq_len"]))
        out.append({"path": str(Path(path).expanduser().resolve()), "weight": float(source.get("weight", 1.0)),
                    "fingerprint": prepared_fingerprint(path), "recorded": False})
    return out


def recorded_seed(run: Run) -> Optional[int]:
    for phase in run.phases:
        recorded = recorded_data(run, phase)
        if recorded and "seed" in recorded:
            return int(recorded["seed"])
    return run.config.get("seed")




def recorded_phase_config(run: Run, phase: str) -> Optional[dict]:
    """The phase's keys as trained: its recorded plan's, else config.yaml's."""
    plan = run.plan(phase)
    return plan["phase_config"] if plan is not None else (run.config.get("phases") or {}).get(phase)
