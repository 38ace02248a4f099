"""Matplotlib figures of runs and scores, for the report and the notebooks (one piece of code, so the
figures never disagree)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import pandas as pd

from ettin.report.runs import WEIGHT_GROUPS, Run

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


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


def _interval_bars(scores: Sequence[float], stderrs: Sequence[Optional[float]]) -> list[float]:
    """Half-widths of the 95% normal intervals (0 where no standard error is recorded)."""
    from ettin.evaluation.uncertainty import Z95

    return [0.0 if e is None or pd.isna(e) or pd.isna(s) else Z95 * float(e) for s, e in zip(scores, stderrs)]


def plot_scores(table: pd.DataFrame, names: Sequence[str]):
    """One panel per task: each model's score with its 95% interval (eval.json's ci95; else score +- 1.96
    stderr), a decided winner's bar marked with a star (``scores.score_table``' table of a pair, or
    ``scores.side_by_side``' of two or three models, which names no winner)."""
    from ettin.report.scores import LETTERS

    tasks = list(table.itertuples(index=False))
    cols = min(3, max(1, len(tasks)))
    rows = max(1, math.ceil(len(tasks) / cols))
    figure, axes = _figure(rows, cols, width=3.2 * cols, height=2.6)
    letters = LETTERS[:len(names)]
    positions = list(range(len(names)))
    for axis, task in zip(axes, tasks):
        scores = [getattr(task, f"score_{letter}") for letter in letters]
        heights = [0.0 if pd.isna(s) else float(s) for s in scores]
        errors = _interval_bars(scores, [getattr(task, f"stderr_{letter}", None) for letter in letters])
        below, above = zip(*((max(0.0, s - i[0]), max(0.0, i[1] - s)) if isinstance(i, (list, tuple)) else (e, e)
                             for s, e, i in zip(heights, errors, (getattr(task, f"ci95_{letter}", None)
                                                                  for letter in letters))))
        bars = axis.bar(positions, heights, color=COLORS[:len(names)], yerr=[below, above], capsize=4,
                        ecolor="black")
        axis.set_xticks(positions, [str(n) for n in names], fontsize=7)
        arrow = "higher" if task.higher_is_better else "lower"
        axis.set_title(f"{task.task} ({task.category})\n{task.metric}, {arrow} is better", fontsize=8)
        for bar, score, error, name in zip(bars, scores, above, names):
            text = "n/a" if pd.isna(score) else f"{score:.3g}"
            if getattr(task, "winner", None) == name:
                text += " ★"
            axis.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height() + error),
                          ha="center", va="bottom", fontsize=8)
        axis.margins(y=0.25)
    for axis in axes[len(tasks):]:
        axis.set_visible(False)
    if not tasks:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no evaluation", ha="center", va="center", color="grey")
    return figure


def plot_scores_over_tokens(table: pd.DataFrame, task: str, runs: Sequence[Run]):
    """One task's score at each evaluated checkpoint against the cumulative token count (the loss plots'
    axis, phase boundaries dotted), one series per run (``scores.checkpoint_scores``' table), with 95%
    intervals where standard errors are recorded."""
    figure, (axis,) = _figure()
    points = table[table["task"] == task]
    for color, run in zip(COLORS, runs):
        mine = points[points["run"] == run.name]
        if len(mine):
            axis.plot(mine["total_tokens"], mine["score"], "o-", color=color, label=run.label)
            errors = _interval_bars(list(mine["score"]), list(mine["stderr"])) if "stderr" in mine else []
            if any(errors):
                axis.errorbar(mine["total_tokens"], mine["score"], yerr=errors, fmt="none", ecolor=color, capsize=3)
    first = points.iloc[0]
    direction = "higher" if first["higher_is_better"] else "lower"
    _finish(axis, runs, f"{task} ({first['category']}) over training", f"{first['metric']} ({direction} is better)",
            True)
    return figure


SERIES_ORDER = ("encoders", "decoders", "encoder-from-decoder", "decoder-from-encoder", "masked diffusion")


def plot_ladder(table: pd.DataFrame, paper: Optional[pd.DataFrame] = None):
    """One panel per task (and category average): score against parameters on a log axis, one line
    per series of the suite (``ettin.report.suite_report``'s table) with 95% intervals where standard errors are
    recorded; with several seeds per member, the line goes through the seeds' mean and each seed is
    a cross; ``paper``'s rows (the Ettin paper's
    scores at the same sizes and tasks) as hollow points in their series' colour."""
    from matplotlib.ticker import NullFormatter

    tasks = list(dict.fromkeys(table["task"]))
    cols = min(3, max(1, len(tasks)))
    rows = max(1, math.ceil(len(tasks) / cols))
    figure, axes = _figure(rows, cols, width=3.4 * cols, height=2.8)
    for axis, task in zip(axes, tasks):
        rows_of_task = table[table["task"] == task]
        for color, series in zip(COLORS, SERIES_ORDER):
            points = rows_of_task[rows_of_task["series"] == series].sort_values("parameters")
            if len(points):
                means = points.groupby("parameters", as_index=False)["score"].mean()  # over seeds, if several
                axis.plot(means["parameters"], means["score"], marker="o", color=color, label=series)
                if len(means) < len(points):  # several seeds: each seed's score, the spread around the mean
                    axis.plot(points["parameters"], points["score"], linestyle="none", marker="x", markersize=4,
                              color=color, label=f"{series} (each seed)")
                errors = _interval_bars(list(points["score"]), list(points["stderr"])) if "stderr" in points else []
                if any(errors):
                    axis.errorbar(points["parameters"], points["score"], yerr=errors, fmt="none", ecolor=color,
                                  capsize=3)
            if paper is not None:
                published = paper[(paper["task"] == task) & (paper["series"] == series)]
                if len(published):
                    axis.plot(published["parameters"], published["score"], linestyle="none", marker="o",
                              markerfacecolor="none", color=color, label=f"{series} (paper)")
        first = rows_of_task.iloc[0]
        axis.set_xscale("log")
        # Ticks at the ladder's own sizes: a log axis over a narrow range labels its minor ticks into
        # an unreadable pile.
        counts = sorted(set(table["parameters"]))
        axis.set_xticks(counts, [_count(c) for c in counts], fontsize=6)
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("parameters", fontsize=8)
        axis.set_title(f"{task}\n{first['metric']}, {first['direction']} is better", fontsize=8)
        axis.legend(fontsize=6)
    for axis in axes[len(tasks):]:
        axis.set_visible(False)
    return figure


def _count(n: float) -> str:
    """277120 -> 277k, 17_000_000 -> 17M."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"


# ------------------------------------------------------------------------------------------------
# Evaluation results


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
    for color, group in zip(COLORS, WEIGHT_GROUPS):
        if group in norms:
            norm.plot(norms["total_tokens"], norms[group], "o-", color=color, label=group)
    _finish(norm, [run], "Weight norms per checkpoint", "L2 norm", len(norms) > 0)
    return figure


