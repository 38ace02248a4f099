"""The pair report of two runs: an encoder and a decoder trained as a pair, or any two runs (then an
A/B comparison, labelled by run name). ``write_report`` writes ``report.md``, a self-contained
``report.html`` and the PNG plots: the data and schedule identity of the two runs, proven from their
metadata and a replay of the loader's order; evaluation scores side by side; each task's score at the
evaluated checkpoints, and loss, learning rate, global batch and throughput, on one cumulative token
axis. The command is ``python -m ettin.compare`` (ettin/compare.py)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from ettin.evaluation import uncertainty
from ettin.report import identity, plots, runs, scores
from ettin.report.render import SMOKE_WARNING, image, render_html, render_markdown
from ettin.store.fs import write_text


def default_out_dir(run_a: Path, run_b: Path) -> Path:
    """``<name>-report`` for the ``<name>-encoder`` / ``<name>-decoder`` pair, else ``A-vs-B``."""
    a, b = run_a.name, run_b.name
    for left, right in ((a, b), (b, a)):
        if left.endswith("-encoder") and right == left[: -len("encoder")] + "decoder":
            return run_a.parent / f"{left[: -len('-encoder')]}-report"
    return run_a.parent / f"{a}-vs-{b}"


# Where the report looks for the checkpoints' evaluation: python -m ettin.eval RUN_A RUN_B --checkpoints
# every:K --out DIR/checkpoint-eval (its own folder: an eval.json holds only the models of its command).
CHECKPOINT_EVAL = "checkpoint-eval"


def find_evaluation(run_a: Path, run_b: Path, out_dir: Path) -> list[Path]:
    """The eval.json files that may hold the pair's scores, in the order they are merged."""
    return [p for p in (run_a / "eval.json", run_b / "eval.json", out_dir / "eval.json",
                        out_dir / CHECKPOINT_EVAL / "eval.json") if p.is_file()]


def write_report(run_a: Path | str, run_b: Path | str, out_dir: Path | str,
                 evaluation: dict | Path | str | Sequence[dict | Path | str] | None = None, *,
                 max_steps: int = identity.MAX_REPLAY_STEPS) -> Path:
    """Write report.md, report.html and the plots of two runs into ``out_dir``; returns report.md.
    ``evaluation``: eval.json files or dicts (merged); None: those ``find_evaluation`` finds."""
    a, b = runs.load_run(run_a), runs.load_run(run_b)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if evaluation is None:
        given = find_evaluation(a.path, b.path, out)
    else:
        given = list(evaluation) if isinstance(evaluation, (list, tuple)) else [evaluation]
    evaluation_sources = [str(g) if isinstance(g, (str, Path)) else "given" for g in given]
    evaluation = scores.load_evaluation(*given)
    blocks = report_blocks(a, b, out, evaluation, evaluation_sources, max_steps=max_steps)
    markdown = render_markdown(blocks)
    write_text(out / "report.md", markdown)
    write_text(out / "report.html", render_html(blocks, out, title=_title(a, b)))
    return out / "report.md"


# ------------------------------------------------------------------------------------------------
# What the report says: a list of blocks, rendered to Markdown and to HTML


def _title(a: runs.Run, b: runs.Run) -> str:
    return f"ettin report: {a.name} vs {b.name}"


def report_blocks(a: runs.Run, b: runs.Run, out: Path, evaluation: Optional[dict],
                  evaluation_sources: Sequence[str], *, max_steps: int) -> list[tuple]:
    blocks: list[tuple] = [("h1", _title(a, b))]
    kind = ("an encoder/decoder pair" if a.kind != b.kind else
            f"an A/B comparison of two {a.kind}s (labelled by run name)")
    blocks.append(("p", f"A = {a.label} at {a.path.resolve()}; B = {b.label} at {b.path.resolve()}. "
                        f"This is {kind}. Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}."))
    blocks.append(("table", runs_table(a, b)))

    checks = identity.identity_checks(a, b, max_steps=max_steps)
    blocks.append(("h2", "Data and schedule identity"))
    blocks.append(("p", identity_verdict(checks)))
    blocks.append(("table", identity.checks_table(checks)))

    blocks.append(("h2", "Evaluation"))
    evaluation, weights, refused = scores.current_scores(evaluation, [a, b])
    if refused:
        blocks.append(("p", scores.refused_warning(refused, f"python -m ettin.eval {a.path} {b.path} "
                                                            f"--out {out} (and --checkpoints ... for checkpoints)")))
    if len(weights):
        blocks.append(("p", "The weights each run's scores were computed from (eval.json's provenance), "
                            "against the run's latest checkpoint:"))
        blocks.append(("table", weights))
    over_training = scores.checkpoint_scores(evaluation, [a, b])
    if evaluation is None:
        blocks.append(("p", "No evaluation found (looked for eval.json in both run folders, in "
                            f"{out} and in {out / CHECKPOINT_EVAL}). Evaluate both with: python -m ettin.eval "
                            f"{a.path} {b.path}, then pass the file with --eval."))
    else:
        if scores.is_smoke(evaluation):
            blocks.append(("p", f"WARNING: {SMOKE_WARNING}"))
        blocks += pair_scores(evaluation, evaluation_sources, a, b, out, checkpoints_only=len(over_training) > 0
                              and not scores.has_pair_scores(evaluation, [a.name, b.name]))
    blocks += scores_over_training(over_training, [a, b], out)

    blocks.append(("h2", "Training curves"))
    if a.objective != b.objective:
        blocks.append(("p", f"Each loss is its own objective's ({a.objective.upper()} vs "
                            f"{b.objective.upper()}): compare how the curves move, not their levels. "
                            "Phase boundaries are dotted; tokens are cumulative over phases."))
    blocks.append(image(plots.plot_losses([a, b]), out, "loss.png", "train and validation loss"))
    blocks.append(("table", final_losses(a, b)))
    blocks.append(image(plots.plot_schedule([a, b]), out, "schedule.png",
                         "learning rate and global batch"))
    blocks.append(image(plots.plot_throughput([a, b]), out, "throughput.png", "throughput"))
    return blocks


UNCERTAINTY_NOTE = (
    f"± is one standard error (eval.json's stderr_method names how each was made: lm-eval's own stderr, the same "
    f"formula over examples or queries, or a bootstrap of {uncertainty.BOOTSTRAP_RESAMPLES} resamples); the bars of "
    f"the figure are 95% intervals. A - B is tested on the same examples (McNemar exact for accuracy, a paired "
    f"bootstrap otherwise; an unpaired z-test where per-example results are missing): a winner is named (★) only "
    f"when p < {uncertainty.LEVEL}, else the difference is within noise.")


def pair_scores(evaluation: dict, sources: Sequence[str], a: runs.Run, b: runs.Run, out: Path, *,
                checkpoints_only: bool) -> list[tuple]:
    """The two final models' scores side by side, each task's winner and the paper's direction."""
    if checkpoints_only:
        return [("p", f"Only checkpoints were evaluated (from {', '.join(sources)}); the final models' scores "
                      f"side by side need: python -m ettin.eval {a.path} {b.path}.")]
    table = scores.score_table(evaluation, a.name, b.name)
    return [("p", f"Suite {evaluation.get('suite')!r}, created {evaluation.get('created')}, from "
                  f"{', '.join(sources)}. {UNCERTAINTY_NOTE} The Ettin paper found encoders ahead on "
                  "classification and retrieval and decoders ahead on generation; 'agrees' is filled only for "
                  "a decided winner."
                  + ("" if a.kind != b.kind else " Both runs are the same kind, so the paper's direction is "
                     "not tested here.")),
            ("table", _scores_for_display(table, a.name, b.name)),
            image(plots.plot_scores(table, [a.name, b.name]), out, "scores.png",
                  "evaluation scores with 95% intervals, decided winner starred")]


def scores_over_training(table: pd.DataFrame, pair: Sequence[runs.Run], out: Path) -> list[tuple]:
    """Each task's score at the evaluated checkpoints on the token axis, one figure per task with the runs as
    series, and the numbers; nothing when no checkpoint was evaluated."""
    if not len(table):
        return []
    blocks: list[tuple] = [("h2", "Scores over training"), (
        "p", "Each evaluated checkpoint (python -m ettin.eval RUN --checkpoints ...) at its cumulative token "
             "count, the axis of the loss curves.")]
    for task in dict.fromkeys(table["task"]):
        blocks.append(image(plots.plot_scores_over_tokens(table, task, pair), out,
                            f"scores-over-tokens-{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}.png",
                            f"{task} over training"))
    numbers = table.pivot_table(index=["run", "checkpoint", "total_tokens"], columns="task", values="score",
                                sort=False).reset_index()
    blocks.append(("table", numbers.rename_axis(None, axis=1)))
    return blocks + noise_over_training(table, pair)


def noise_over_training(table: pd.DataFrame, pair: Sequence[runs.Run]) -> list[tuple]:
    """Each task's checkpoint-to-checkpoint noise beside the runs' difference (the signal), and the tasks
    that cannot tell the two apart at this scale."""
    noise = scores.checkpoint_noise(table, pair)
    if not len(noise):
        return [("p", f"Signal and noise: needs at least two evaluated checkpoints of a phase in each run "
                      f"(python -m ettin.eval ... --checkpoints every:K).")]
    final = noise.groupby("task", sort=False).tail(1)  # each task's last phase
    blind = list(final.loc[final["separates"] == "no", "task"])
    return [("h2", "Signal and noise over training"),
            ("p", f"Noise: the standard deviation (n-1) of a run's scores over its last {scores.NOISE_CHECKPOINTS} "
                  f"evaluated checkpoints of a phase (AI2, 'Signal and Noise', 2025). Signal: the difference of the "
                  f"runs' means over those checkpoints. A task separates the runs when the signal exceeds "
                  f"{scores.SEPARATES:g} x the noise of the difference (the two noises' root sum of squares). "
                  + (f"Cannot separate the runs at this scale (last phase): {', '.join(blind)}." if blind else
                     "Every task separates the runs in its last phase.")),
            ("table", noise.round(4))]


def runs_table(a: runs.Run, b: runs.Run) -> pd.DataFrame:
    rows = {}
    for key, run in (("A", a), ("B", b)):
        final = run.checkpoints[-1] if run.checkpoints else None
        rows[key] = {
            "run": run.name, "objective": run.objective, "kind": run.kind,
            "phases": ", ".join(f"{p} ({run.phase_objective(p)}, {run.phase_tokens[p]:,} tokens)"
                                for p in run.phases),
            "final checkpoint": final.path.name if final else "none",
            "git commit": final.meta.get("git_commit", "not recorded") if final else "not recorded",
        }
    return pd.DataFrame(rows).rename_axis("").reset_index()


def identity_verdict(checks: Sequence[identity.Check]) -> str:
    counts = {s: [c for c in checks if c.status == s]
              for s in (identity.IDENTICAL, identity.DIFFERS, identity.NOT_RECORDED)}
    where = lambda cs: ", ".join(f"{c.name}{' (' + c.phase + ')' if c.phase else ''}" for c in cs)
    text = f"{len(counts['identical'])} of {len(checks)} checks identical."
    if counts["differs"]:
        text += f" DIFFERS: {where(counts['differs'])}."
    if counts["not recorded"]:
        text += f" Not recorded: {where(counts['not recorded'])}."
    if not counts["differs"] and not counts["not recorded"]:
        text += " The two runs saw the same data in the same order under the same schedule."
    return text


def final_losses(a: runs.Run, b: runs.Run) -> pd.DataFrame:
    rows = []
    for phase in a.phases + [p for p in b.phases if p not in a.phases]:
        row = {"phase": phase}
        for run in (a, b):
            for column, label in (("train/loss", "train"), ("val/loss", "validation")):
                curve = run.curve(column)
                curve = curve[curve["phase"] == phase]
                row[f"{run.name} {label}"] = f"{curve[column].iloc[-1]:.4f}" if len(curve) else "not recorded"
        rows.append(row)
    return pd.DataFrame(rows)


def _with_error(score, stderr) -> str:
    if pd.isna(score):
        return "n/a"
    return f"{score:.4g} ± {stderr:.2g}" if stderr is not None and not pd.isna(stderr) else f"{score:.4g} ± ?"


def _p_value(p) -> str:
    if p is None or pd.isna(p):
        return "-"
    return "< 0.001" if p < 0.001 else f"{p:.3g}"


def _scores_for_display(table: pd.DataFrame, name_a: str, name_b: str) -> pd.DataFrame:
    """``score ± stderr`` per model (★ on a decided winner), the difference with its 95% interval, the
    p-value and the test that decided."""
    shown = pd.DataFrame({"task": table["task"], "category": table["category"], "metric": table["metric"],
                          "better": ["higher" if h else "lower" for h in table["higher_is_better"]]})
    for name, score, stderr in ((name_a, "score_a", "stderr_a"), (name_b, "score_b", "stderr_b")):
        shown[name] = [_with_error(s, e) + (" ★" if w == name else "")
                       for s, e, w in zip(table[score], table[stderr], table["winner"])]
    shown["A - B [95% interval]"] = ["-" if d is None or pd.isna(d) else f"{d:+.4g} [{ci[0]:+.3g}, {ci[1]:+.3g}]"
                                     for d, ci in zip(table["difference"], table["difference_ci95"])]
    shown["p"] = [_p_value(p) for p in table["p_value"]]
    shown["test"] = ["-" if pd.isna(t) else t for t in table["test"]]
    shown["winner"] = table["winner"]
    shown["Ettin paper"] = table["paper"]
    shown["agrees"] = table["agrees"]
    return shown
