"""Reading ettin runs and drawing them: the functions behind ``python -m ettin.compare`` and the
notebooks in ``notebooks/`` (one piece of code for both, so the figures never disagree).

* ``load_run(path)``: a run directory as data: its config, every row of ``logs/<phase>/metrics.csv``
  on one cumulative token axis (each phase offset by the final tokens of the phases before it), and
  its checkpoints.
* ``plot_losses / plot_schedule / plot_throughput / plot_scores``: matplotlib figures of runs.
* ``load_evaluation / score_table``: ``eval.json`` files (format ``ettin-eval/1``) side by side.
* ``identity_checks(run_a, run_b)``: the data and schedule identity of two runs, proven from their
  metadata and by replaying the loader's deterministic sample order (``ettin.data.loader``).
* ``checkpoint_table / weight_norms / checkpoint_losses / attention_layout / export_parity``: one
  run's checkpoints and export, for ``notebooks/checkpoint_analysis.ipynb``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

RUN_LAYOUT = ("config.yaml, logs/<phase>/metrics.csv and checkpoints/<phase>-step...-tok.../ (what "
              "python -m ettin.train writes to <output_dir>/<run_name>)")
EVAL_FORMAT = "ettin-eval/1"
# Replay bounds of the sample-order check: every step of a small run, a sample of a big one.
MAX_REPLAY_STEPS = 2000
MAX_REPLAY_SAMPLES = 100_000  # samples whose tokens are hashed per phase (reading them is the cost)
SPREAD_POSITIONS = 2000
# What the Ettin paper found, per task category, for an encoder/decoder pair of one size.
PAPER_DIRECTION = {"classification": "encoder", "retrieval": "encoder", "generation": "decoder"}
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


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

    @property
    def kind(self) -> str:
        from ettin.objectives import OBJECTIVES

        objective = OBJECTIVES.get(self.objective)
        return "decoder" if objective is not None and objective.causal else "encoder"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.objective.upper()} {self.kind})"

    def phase_end(self, phase: str) -> Optional[Checkpoint]:
        """The checkpoint that ended ``phase`` (else its latest one), or None."""
        mine = [c for c in self.checkpoints if c.phase == phase]
        ends = [c for c in mine if c.meta.get("phase_end")]
        return (ends or mine or [None])[-1]

    def phase_config(self, phase: str):
        """The ``PhaseConfig`` of ``phase`` from config.yaml. Only the phase's keys are read, so a
        run written by another version of ettin (other top-level keys) still replays."""
        from dataclasses import fields

        from ettin.recipes import PhaseConfig

        raw = (self.config.get("phases") or {}).get(phase)
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

    from ettin.checkpoint import list_checkpoints, read_meta

    path = Path(path)
    if not path.is_dir():
        state = "does not exist" if not path.exists() else "is a file, not a folder"
        raise RunError(f"{path} is not an ettin run directory: it {state}; expected a folder with "
                       f"{RUN_LAYOUT}")
    config_file = path / "config.yaml"
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
    metas = [(p, read_meta(p)) for p in list_checkpoints(path)]
    tables = {phase: _read_metrics(path / "logs" / phase / "metrics.csv") for phase in phases}
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


def _figure(rows: int = 1, cols: int = 1, width: float = 8.0, height: float = 3.6):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, list(axes.flat)


def _phase_boundaries(axis, runs: Sequence[Run]) -> None:
    """A vertical line where each phase starts, labelled; runs with other boundaries add theirs."""
    drawn = set()
    for index, run in enumerate(runs):
        for phase in run.phases[1:]:
            x = run.offsets[phase]
            if x in drawn:
                continue
            drawn.add(x)
            axis.axvline(x, color="grey", linestyle=":" if index == 0 else "--", linewidth=0.9)
            axis.annotate(phase, (x, 1.0), xycoords=("data", "axes fraction"), fontsize=8,
                          color="grey", rotation=90, va="top", ha="right")


def _plot_column(axis, runs: Sequence[Run], column: str, *, label_suffix: str = "", marker=None,
                 linestyle="-") -> bool:
    plotted = False
    for color, run in zip(COLORS, runs):
        curve = run.curve(column)
        if len(curve):
            axis.plot(curve["total_tokens"], curve[column], color=color, marker=marker,
                      linestyle=linestyle, markersize=4, label=f"{run.label}{label_suffix}")
            plotted = True
    return plotted


def _finish(axis, runs: Sequence[Run], title: str, ylabel: str, plotted: bool) -> None:
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("tokens (cumulative over phases)")
    axis.set_ylabel(ylabel)
    _phase_boundaries(axis, runs)
    if plotted:
        axis.legend(fontsize=8)
    else:
        axis.text(0.5, 0.5, "not recorded", transform=axis.transAxes, ha="center", va="center",
                  color="grey")


def plot_losses(runs: Sequence[Run]):
    """Train loss (lines) and validation loss (points) of the runs on one token axis."""
    figure, (axis,) = _figure()
    plotted = _plot_column(axis, runs, "train/loss", label_suffix=" train")
    plotted |= _plot_column(axis, runs, "val/loss", label_suffix=" validation", marker="o",
                            linestyle="--")
    _finish(axis, runs, "Loss (each model's own objective)", "cross-entropy (nats)", plotted)
    return figure


def plot_schedule(runs: Sequence[Run]):
    """Learning rate and global batch (sequences per optimizer step) on the token axis."""
    figure, (lr, batch) = _figure(rows=2, height=2.8)
    _finish(lr, runs, "Learning rate", "LR", _plot_column(lr, runs, "train/lr"))
    _finish(batch, runs, "Global batch", "sequences per step",
            _plot_column(batch, runs, "train/global_batch"))
    return figure


def plot_throughput(runs: Sequence[Run]):
    """Tokens per second and TFLOP/s per device on the token axis."""
    figure, (speed, flops) = _figure(rows=2, height=2.8)
    _finish(speed, runs, "Throughput", "tokens / s / device",
            _plot_column(speed, runs, "perf/tokens_per_s_per_device"))
    _finish(flops, runs, "Model FLOP rate", "TFLOP/s / device",
            _plot_column(flops, runs, "perf/tflops_per_device"))
    return figure


def plot_scores(table: pd.DataFrame, names: Sequence[str]):
    """One panel per task: both models' scores, the winner's bar marked with a star."""
    tasks = list(table.itertuples(index=False))
    cols = min(3, max(1, len(tasks)))
    rows = max(1, math.ceil(len(tasks) / cols))
    figure, axes = _figure(rows, cols, width=3.2 * cols, height=2.6)
    for axis, task in zip(axes, tasks):
        scores = [getattr(task, "score_a"), getattr(task, "score_b")]
        heights = [0.0 if pd.isna(s) else float(s) for s in scores]
        bars = axis.bar([0, 1], heights, color=COLORS[:2])
        axis.set_xticks([0, 1], [str(n) for n in names], fontsize=7)
        arrow = "higher" if task.higher_is_better else "lower"
        axis.set_title(f"{task.task} ({task.category})\n{task.metric}, {arrow} is better", fontsize=8)
        for bar, score, name in zip(bars, scores, names):
            text = "n/a" if pd.isna(score) else f"{score:.3g}"
            if task.winner == name:
                text += " ★"
            axis.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)
        axis.margins(y=0.25)
    for axis in axes[len(tasks):]:
        axis.set_visible(False)
    if not tasks:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no evaluation", ha="center", va="center", color="grey")
    return figure


# ------------------------------------------------------------------------------------------------
# Evaluation results


def load_evaluation(*sources: dict | Path | str) -> Optional[dict]:
    """One evaluation from eval.json files or dicts (their models merged); None when none given."""
    merged: Optional[dict] = None
    for source in sources:
        if isinstance(source, (str, Path)):
            path = Path(source)
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise RunError(f"{path} is not a readable eval.json ({error}); write one with "
                               "python -m ettin.eval RUN_A RUN_B") from None
            where = str(path)
        else:
            data, where = source, "the evaluation"
        if not isinstance(data, dict) or data.get("format") != EVAL_FORMAT or \
                not isinstance(data.get("models"), dict):
            raise RunError(f"{where} is not an ettin evaluation: expected a JSON object with "
                           f"format {EVAL_FORMAT!r} and models {{name: {{tasks: ...}}}}")
        if merged is None:
            merged = {**data, "models": dict(data["models"])}
        else:
            merged["models"].update(data["models"])
            if data.get("suite") != merged.get("suite"):
                merged["suite"] = f"{merged.get('suite')} + {data.get('suite')}"
    return merged


def is_smoke(evaluation: Optional[dict]) -> bool:
    """True when any task is a smoke task (or the suite is the offline one that ships with ettin)."""
    if not evaluation:
        return False
    if evaluation.get("suite") == "offline":
        return True
    return any(task.get("smoke") for model in evaluation["models"].values()
               for task in model.get("tasks", {}).values())


def score_table(evaluation: Optional[dict], name_a: str, name_b: str) -> pd.DataFrame:
    """Per task: both scores, the winner (by the metric's direction), what the Ettin paper found
    for the task's category and whether this pair agrees."""
    columns = ["task", "category", "metric", "higher_is_better", "score_a", "score_b", "winner",
               "paper", "agrees", "smoke"]
    if not evaluation:
        return pd.DataFrame(columns=columns)
    models = evaluation["models"]
    missing = [n for n in (name_a, name_b) if n not in models]
    if missing:
        raise RunError(f"the evaluation has no results for {', '.join(missing)} (it holds "
                       f"{', '.join(models) or 'no model'}); evaluate with python -m ettin.eval "
                       f"{name_a} {name_b}")
    a, b = models[name_a], models[name_b]
    kinds = {name_a: a.get("kind"), name_b: b.get("kind")}
    rows = []
    for task in sorted(set(a.get("tasks", {})) | set(b.get("tasks", {}))):
        ta, tb = a.get("tasks", {}).get(task), b.get("tasks", {}).get(task)
        first = ta or tb
        score_a = ta["score"] if ta else float("nan")
        score_b = tb["score"] if tb else float("nan")
        higher = bool(first.get("higher_is_better", True))
        if not (ta and tb):
            winner = "not evaluated on both"
        elif ta.get("metric") != tb.get("metric"):
            winner = f"not comparable ({ta.get('metric')} vs {tb.get('metric')})"
        elif score_a == score_b:
            winner = "tie"
        else:
            winner = name_a if (score_a > score_b) == higher else name_b
        expected = PAPER_DIRECTION.get(first.get("category"))
        if expected is None:
            paper = "-"
        elif kinds[name_a] == kinds[name_b]:
            paper = f"{expected}s (not tested: both are {kinds[name_a]}s)"
        else:
            paper = f"{expected}s ahead"
        if winner in (name_a, name_b) and expected and kinds[name_a] != kinds[name_b]:
            agrees = "yes" if kinds[winner] == expected else "no"
        else:
            agrees = "-"
        rows.append([task, first.get("category"), first.get("metric"), higher, score_a, score_b,
                     winner, paper, agrees, bool((ta or {}).get("smoke") or (tb or {}).get("smoke"))])
    return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------------------------------------
# Data and schedule identity


IDENTICAL, DIFFERS, NOT_RECORDED = "identical", "differs", "not recorded"


@dataclass
class Check:
    name: str
    phase: str  # "" for the whole run
    status: str  # identical / differs / not recorded
    a: Any
    b: Any
    how: str  # where the values come from, what was compared


def _compare(name: str, phase: str, a: Any, b: Any, how: str) -> Check:
    if a is None or b is None:
        status = NOT_RECORDED
    else:
        status = IDENTICAL if a == b else DIFFERS
    return Check(name, phase, status, a, b, how)


def _phase_config(run: Run, phase: str) -> Optional[dict]:
    return (run.config.get("phases") or {}).get(phase)


def _recorded_data(run: Run, phase: str) -> Optional[dict]:
    """The ``data`` entry of the phase's final checkpoint meta (recorded by newer runs)."""
    end = run.phase_end(phase)
    return end.meta.get("data") if end is not None else None


def data_sources(run: Run, phase: str) -> Optional[list[dict]]:
    """(path, weight, fingerprint) of each source of a phase: recorded in the checkpoint meta when
    the run recorded it, else from config.yaml (``builtin`` is data_dir/builtin-<seq_len>, as
    ettin.train resolves it) with the fingerprint computed now from the folder's summary.json."""
    recorded = _recorded_data(run, phase)
    if recorded and recorded.get("sources") is not None:
        return [{"path": str(s.get("path")), "weight": float(s.get("weight", 1.0)),
                 "format": s.get("format", "prepared"), "fingerprint": s.get("fingerprint"),
                 "recorded": True} for s in recorded["sources"]]
    from ettin.data.corpus import builtin_data_path
    from ettin.data.loader import prepared_fingerprint

    sources = (run.config.get("data") or {}).get(phase)
    phase_cfg = _phase_config(run, phase)
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


def _phase_values(run: Run, phase: str, keys: Sequence[str]) -> Optional[dict]:
    """``keys`` of a phase: from the data identity its phase-end checkpoint recorded when there, else
    from config.yaml (``global_batch`` and ``peak_lr`` are run-level keys there)."""
    p = _phase_config(run, phase)
    if p is None:
        return None
    recorded = _recorded_data(run, phase) or {}
    run_level = {"global_batch": run.config.get("global_batch"),
                 "peak_lr": (run.config.get("optim") or {}).get("lr")}
    return {k: recorded[k] if k in recorded else run_level[k] if k in run_level else p.get(k)
            for k in keys}


def _model_shape(run: Run) -> Optional[dict]:
    """The final model's shape: its config without what an objective changes (causal, dropout)."""
    if not run.checkpoints:
        return None
    config = dict(run.checkpoints[-1].meta.get("model_config") or {})
    for key in ("causal", "attn_implementation", "global_rope_theta", "local_rope_theta"):
        config.pop(key, None)
    return {k: v for k, v in config.items() if "dropout" not in k} or None


def _seed(run: Run) -> Optional[int]:
    for phase in run.phases:
        recorded = _recorded_data(run, phase)
        if recorded and "seed" in recorded:
            return int(recorded["seed"])
    return run.config.get("seed")


def _counters(run: Run, phase: str) -> Optional[dict]:
    end = run.phase_end(phase)
    if end is None or not end.meta.get("phase_end"):
        return None
    state = end.meta.get("loader_state") or {}
    return {"steps": state.get("step", end.step), "samples": state.get("samples"),
            "tokens": state.get("tokens", end.tokens)}


def identity_checks(run_a: Run, run_b: Run, *, max_steps: int = MAX_REPLAY_STEPS,
                    spread_positions: int = SPREAD_POSITIONS) -> list[Check]:
    """Every data and schedule identity check of a pair, each identical / differs / not recorded."""
    checks = [
        _compare("phases", "", run_a.phases, run_b.phases, "phase order of config.yaml"),
        _compare("seed", "", _seed(run_a), _seed(run_b),
                 "checkpoint meta data.seed when recorded, else config.yaml seed"),
        _compare("model shape", "", _model_shape(run_a), _model_shape(run_b),
                 "final checkpoint's model_config, without causal, dropout and backend"),
    ]
    phases = run_a.phases + [p for p in run_b.phases if p not in run_a.phases]
    for phase in phases:
        recorded = _recorded_data(run_a, phase) is not None and _recorded_data(run_b, phase) is not None
        where = "the phase-end checkpoint's recorded data" if recorded else "config.yaml"

        def compare(name: str, keys: Sequence[str], how: str = "") -> Check:
            return _compare(name, phase, _phase_values(run_a, phase, keys),
                            _phase_values(run_b, phase, keys), how or where)

        checks.append(compare("sequence length", ["seq_len"]))
        checks.append(compare("global batch", ["global_batch", "batch_warmup_tokens", "batch_warmup_min"]))
        checks.append(compare("token budget", ["tokens"], "config.yaml phases.<phase>.tokens"))
        checks.append(compare("LR schedule", ["peak_lr", "lr_scale", "lr_schedule", "warmup_tokens",
                                              "decay_tokens", "final_lr_ratio"], "config.yaml"))
        checks.append(compare("RoPE theta", ["global_rope_theta", "local_rope_theta"], "config.yaml"))
        sa, sb = data_sources(run_a, phase), data_sources(run_b, phase)
        checks.append(_compare("data sources (path, weight)", phase,
                               None if sa is None else [(s["path"], s["weight"]) for s in sa],
                               None if sb is None else [(s["path"], s["weight"]) for s in sb],
                               where if recorded else "config.yaml data.<phase>"))
        fa = None if sa is None or any(s["fingerprint"] is None for s in sa) else [s["fingerprint"] for s in sa]
        fb = None if sb is None or any(s["fingerprint"] is None for s in sb) else [s["fingerprint"] for s in sb]
        checks.append(_compare("prepared data fingerprint", phase, fa, fb,
                               "sha256 of each folder's summary.json, " +
                               ("recorded at training" if recorded else "computed now (not recorded)")))
        checks.append(_compare("tokens seen", phase, _counters(run_a, phase), _counters(run_b, phase),
                               "loader counters of the phase-end checkpoint"))
        checks.extend(order_checks(run_a, run_b, phase, max_steps=max_steps,
                                   spread_positions=spread_positions))
    return checks


@dataclass
class Replay:
    """The samples a run's phase consumed, rebuilt from its metadata without training."""

    steps: list[tuple[int, int, str]]  # per step: global batch, step tokens, digest of its token ids
    total_steps: Optional[int]  # steps the run took in the phase (None: not recorded)
    after: dict  # loader counters after the replayed steps
    boundaries: set  # the token clock after each replayed step
    spread: list[tuple[int, str]]  # (position, digest of its tokens) over the whole phase
    total_samples: Optional[int]


def replay(run: Run, phase: str, *, max_steps: int = MAX_REPLAY_STEPS,
           spread_positions: int = SPREAD_POSITIONS, max_samples: int = MAX_REPLAY_SAMPLES) -> Replay:
    """Replay the loader's order (a function of seed, phase and global sample index) for the first
    ``max_steps`` steps of ``phase`` (fewer if they hold more than ``max_samples`` samples): each
    step's global batch (the batch schedule on the replayed token clock), its tokens and a digest of
    every token id it fed. A phase with more steps also gets ``spread_positions`` positions spread
    over all the samples it consumed."""
    from ettin.data.loader import StepBatches
    from ettin.schedule import phase_batch_schedule

    sources = data_sources(run, phase)
    if sources is None:
        raise RunError(f"{run.path}: no data recorded for phase {phase}")
    if any(s.get("format") == "order" for s in sources):  # its order is the released files' own
        raise RunError(f"{run.name} phase {phase} replays a released data order: compared by its "
                       "files (data sources), not replayed here")
    values = _phase_values(run, phase, ["seq_len", "global_batch", "batch_warmup_tokens",
                                        "batch_warmup_min"])
    p = replace(run.phase_config(phase), seq_len=int(values["seq_len"]),
                batch_warmup_tokens=int(values["batch_warmup_tokens"]),
                batch_warmup_min=int(values["batch_warmup_min"]))
    try:
        batches = StepBatches([(s["path"], s["weight"]) for s in sources], split="train",
                              seq_len=p.seq_len, collator=None, global_batch_at=phase_batch_schedule(p, int(values["global_batch"])),
                              micro_batch_size=p.micro_batch, seed=_seed(run), phase=phase)
    except (FileNotFoundError, ValueError) as error:
        raise RunError(f"cannot replay {run.name} phase {phase}: {error}") from None
    counters = _counters(run, phase)
    total = counters["steps"] if counters else None
    wanted = max_steps if total is None else min(max_steps, total)

    def digest(positions: np.ndarray) -> str:
        source, index = batches.mixture.locate(positions)
        h = hashlib.blake2b(digest_size=12)
        for s, i in zip(source, index):
            h.update(np.asarray(batches.splits[int(s)].tokens(int(i)), dtype=np.int64).tobytes())
        return h.hexdigest()

    steps, boundaries, after = [], set(), {"steps": 0, "samples": 0, "tokens": 0}
    plan = batches.plan()
    while len(steps) < wanted and after["samples"] < max_samples:
        state, batch, step_tokens = next(plan)
        steps.append((batch, step_tokens, digest(np.arange(state.samples, state.samples + batch))))
        after = {"steps": state.step + 1, "samples": state.samples + batch,
                 "tokens": state.tokens + step_tokens}
        boundaries.add(after["tokens"])
    spread = []
    samples = counters.get("samples") if counters else None
    if total is not None and len(steps) < total and samples:
        for position in np.unique(np.linspace(0, samples - 1, spread_positions).astype(np.int64)):
            spread.append((int(position), digest(np.array([position]))))
    return Replay(steps, total, after, boundaries, spread, samples)


def order_checks(run_a: Run, run_b: Run, phase: str, *, max_steps: int = MAX_REPLAY_STEPS,
                 spread_positions: int = SPREAD_POSITIONS) -> list[Check]:
    """The sample order of both runs replayed and compared step by step, and each replay checked
    against what the run itself recorded (its final counters and every logged token clock)."""
    replays, reasons = {}, {}
    for key, run in (("a", run_a), ("b", run_b)):
        if phase not in run.phases:
            reasons[key] = f"{run.name} has no phase {phase}"
            continue
        try:
            replays[key] = replay(run, phase, max_steps=max_steps, spread_positions=spread_positions)
        except RunError as error:
            reasons[key] = str(error)
    if reasons:
        why = "; ".join(reasons.values())
        return [Check("sample order", phase, NOT_RECORDED, reasons.get("a", "-"), reasons.get("b", "-"),
                      f"cannot replay: {why}")]
    ra, rb = replays["a"], replays["b"]
    checks = []
    n = min(len(ra.steps), len(rb.steps))
    first = next((i for i in range(n) if ra.steps[i] != rb.steps[i]), None)
    how = (f"replayed the loader order of both runs: {n:,} of {ra.total_steps or '?'} steps compared "
           "(global batch, step tokens, digest of every token id)")
    if ra.spread or rb.spread:
        how += f", plus {len(ra.spread):,} sample positions spread over the phase"
    if first is not None:
        checks.append(Check("sample order", phase, DIFFERS,
                            f"step {first + 1}: batch {ra.steps[first][0]}, {ra.steps[first][1]} tokens, "
                            f"digest {ra.steps[first][2]}",
                            f"step {first + 1}: batch {rb.steps[first][0]}, {rb.steps[first][1]} tokens, "
                            f"digest {rb.steps[first][2]}", how))
    elif len(ra.steps) != len(rb.steps) or ra.spread != rb.spread:
        checks.append(Check("sample order", phase, DIFFERS, f"{len(ra.steps)} steps replayed",
                            f"{len(rb.steps)} steps replayed", how))
    elif n == 0:
        checks.append(Check("sample order", phase, NOT_RECORDED, "no steps", "no steps", how))
    else:
        digest = hashlib.blake2b("".join(s[2] for s in ra.steps).encode(), digest_size=8).hexdigest()
        checks.append(Check("sample order", phase, IDENTICAL, f"{n:,} steps, digest {digest}",
                            f"{n:,} steps, digest {digest}", how))
    consistency = [_replay_matches_record(run, r, phase) for run, r in ((run_a, ra), (run_b, rb))]
    statuses = {c[0] for c in consistency}
    status = DIFFERS if DIFFERS in statuses else NOT_RECORDED if NOT_RECORDED in statuses else IDENTICAL
    checks.append(Check("replay vs the run's own records", phase, status, consistency[0][1],
                        consistency[1][1],
                        "the replayed counters equal the phase-end checkpoint's, and every logged "
                        "train/tokens is a replayed step boundary"))
    return checks


def _replay_matches_record(run: Run, replayed: Replay, phase: str) -> tuple[str, str]:
    recorded = _counters(run, phase)
    problems, notes = [], []
    if recorded is None:
        return NOT_RECORDED, "no phase-end checkpoint"
    if len(replayed.steps) == recorded["steps"]:
        if replayed.after != recorded:
            problems.append(f"replay ends at {replayed.after}, checkpoint says {recorded}")
        else:
            notes.append(f"{recorded['steps']:,} steps, {recorded['samples']:,} samples, "
                         f"{recorded['tokens']:,} tokens as recorded")
    else:
        notes.append(f"first {len(replayed.steps):,} of {recorded['steps']:,} steps replayed")
    logged = run.curve("train/tokens")
    logged = logged[logged["phase"] == phase]["train/tokens"].astype(int)
    if len(replayed.steps) < (recorded["steps"] or 0):
        logged = logged[logged <= replayed.after["tokens"]]
    off = sorted(set(logged) - replayed.boundaries)
    if off:
        problems.append(f"{len(off)} logged train/tokens are no replayed step boundary (first {off[0]:,})")
    elif len(logged):
        notes.append(f"{len(logged):,} logged token counts match")
    if problems:
        return DIFFERS, "; ".join(problems)
    return IDENTICAL, "; ".join(notes)


def checks_table(checks: Sequence[Check]) -> pd.DataFrame:
    """The checks as a table; of two mappings that differ only the keys that differ are shown."""
    rows = []
    for c in checks:
        a, b = c.a, c.b
        if isinstance(a, dict) and isinstance(b, dict) and c.status == DIFFERS:
            keys = [k for k in {**a, **b} if a.get(k) != b.get(k)]
            a, b = {k: a.get(k) for k in keys}, {k: b.get(k) for k in keys}
        rows.append({"check": c.name, "phase": c.phase, "status": c.status, "A": _short(a),
                     "B": _short(b), "how": c.how})
    return pd.DataFrame(rows)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "; ".join(_short(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    text = "not recorded" if value is None else str(value)
    return text if len(text) <= 200 else text[:200] + "..."


# ------------------------------------------------------------------------------------------------
# One run's checkpoints and export (notebooks/checkpoint_analysis.ipynb)


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
    from ettin.checkpoint import TIED, load_weights

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
    sequence length, the run's objective and validation mask rate), so checkpoints compare."""
    import torch

    from ettin.data.loader import validation_batches
    from ettin.data.tokenizer import load_tokenizer
    from ettin.export import load_checkpoint_model
    from ettin.objectives import OBJECTIVES

    if not run.checkpoints:
        raise RunError(f"{run.path} has no complete checkpoint")
    phase = run.phases[-1]
    p = run.phase_config(phase)
    sources = data_sources(run, phase)
    tokenizer = load_tokenizer(run.checkpoints[-1].meta["tokenizer"])
    mask_rate = float((run.config.get("trainer") or {}).get("val_mask_rate", 0.15))
    collator = OBJECTIVES[run.objective].collator(tokenizer, mask_rate=mask_rate, seed=int(_seed(run)))
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


def plot_checkpoints(run: Run, losses: pd.DataFrame, norms: pd.DataFrame):
    """The run's train loss with each checkpoint's loss on the fixed validation samples, and the
    weight norms of each checkpoint, on the cumulative token axis."""
    figure, (loss, norm) = _figure(rows=2, height=3.0)
    plotted = _plot_column(loss, [run], "train/loss", label_suffix=" train (logged)")
    if len(losses):
        loss.plot(losses["total_tokens"], losses["loss"], "o--", color="black",
                  label="checkpoints on fixed validation samples")
        plotted = True
    _finish(loss, [run], "Loss of the intermediate checkpoints", "cross-entropy (nats)", plotted)
    for color, group in zip(COLORS + ("tab:purple",), WEIGHT_GROUPS):
        if group in norms:
            norm.plot(norms["total_tokens"], norms[group], "o-", color=color, label=group)
    _finish(norm, [run], "Weight norms per checkpoint", "L2 norm", len(norms) > 0)
    return figure


def attention_layout(run: Run, export: Optional[Path | str] = None) -> pd.DataFrame:
    """Per layer: attention kind, window and RoPE theta in our final checkpoint, and as the installed
    transformers reads the export's config.json (``ettin.hub.from_hf_config``)."""
    from ettin.config import ModelConfig
    from ettin.hub import from_hf_config

    if not run.checkpoints:
        raise RunError(f"{run.path} has no complete checkpoint")
    ours = ModelConfig(**run.checkpoints[-1].meta["model_config"])
    folder = Path(export) if export is not None else run.path / "hf"
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

    from ettin.export import check_parity, load_checkpoint_model

    if not run.checkpoints:
        raise RunError(f"{run.path} has no complete checkpoint")
    folder = Path(export) if export is not None else run.path / "hf"
    if not (folder / "config.json").is_file():
        raise RunError(f"{folder} is not an export (no config.json); write one with "
                       f"python -m ettin.export {run.path} {folder}")
    model, _ = load_checkpoint_model(run.checkpoints[-1].path)
    return check_parity(folder, model, AutoTokenizer.from_pretrained(str(folder)), torch.float32)
