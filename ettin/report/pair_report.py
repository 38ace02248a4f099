"""The pair report of two runs: an encoder and a decoder trained as a pair, or any two runs (then an
A/B comparison, labelled by run name); or of three runs (say an encoder, a decoder and a masked
diffusion model), side by side. ``write_report`` writes ``report.md``, a self-contained ``report.html``
and the PNG plots: the data and schedule identity of each run against run A, proven from their
metadata and a replay of the loader's order; evaluation scores side by side, each pair of runs tested;
each task's score at the evaluated checkpoints, and loss, learning rate, global batch and throughput, on
one cumulative token axis. The command is ``python -m ettin.compare`` (ettin/compare.py)."""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from ettin.evaluation import uncertainty
from ettin.report import identity, plots, runs, scores
from ettin.report.render import SMOKE_WARNING, image, render_html, render_markdown
from ettin.store.rundir import RunDir
from ettin.store.fs import write_text


# The runs' letters in the report, in the order given (RUN_A RUN_B [RUN_C]): score_a's run is A.
LETTERS = scores.LETTERS.upper()
# How the report says "every run" of two or three.
EVERY = {2: "both", 3: "all three"}


def default_out_dir(run_a: Path, run_b: Path, run_c: Optional[Path] = None) -> Path:
    """``<name>-report`` for the ``<name>-encoder`` / ``<name>-decoder`` pair, else ``A-vs-B`` (``A-vs-B-vs-C``)."""
    a, b = run_a.name, run_b.name
    for left, right in ((a, b), (b, a)) if run_c is None else ():
        if left.endswith("-encoder") and right == left[: -len("encoder")] + "decoder":
            return run_a.parent / f"{left[: -len('-encoder')]}-report"
    return run_a.parent / "-vs-".join(r.name for r in (run_a, run_b, run_c) if r is not None)


# Where the report looks for the checkpoints' evaluation: python -m ettin.eval RUN_A RUN_B --checkpoints
# every:K --out DIR/checkpoint-eval (its own folder: an eval.json holds only the models of its command).
CHECKPOINT_EVAL = "checkpoint-eval"


def find_evaluation(out_dir: Path, *run_dirs: Path) -> list[Path]:
    """The eval.json files that may hold the runs' scores, in the order they are merged: each run's own
    (``RUN/eval.json``, and ``RUN/eval/eval.json`` of ``python -m ettin.train pair=false``), the report
    folder's, and its checkpoint evaluation's."""
    own = [path for r in run_dirs for path in (r / "eval.json", RunDir(r).evaluation() / "eval.json")]
    return [p for p in (*own, out_dir / "eval.json",
                        out_dir / CHECKPOINT_EVAL / "eval.json") if p.is_file()]


def write_report(run_a: Path | str, run_b: Path | str, out_dir: Path | str,
                 evaluation: dict | Path | str | Sequence[dict | Path | str] | None = None, *,
                 run_c: Path | str | None = None, max_steps: int = identity.MAX_REPLAY_STEPS) -> Path:
    """Write report.md, report.html and the plots of two runs (three with ``run_c``) into ``out_dir``;
    returns report.md. ``evaluation``: eval.json files or dicts (merged); None: those ``find_evaluation``
    finds."""
    compared = [runs.load_run(r) for r in (run_a, run_b, run_c) if r is not None]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if evaluation is None:
        given = find_evaluation(out, *(r.path for r in compared))
    else:
        given = list(evaluation) if isinstance(evaluation, (list, tuple)) else [evaluation]
    evaluation_sources = [str(g) if isinstance(g, (str, Path)) else "given" for g in given]
    evaluation = scores.load_evaluation(*given)
    blocks = report_blocks(compared, out, evaluation, evaluation_sources, max_steps=max_steps)
    markdown = render_markdown(blocks)
    write_text(out / "report.md", markdown)
    write_text(out / "report.html", render_html(blocks, out, title=_title(compared)))
    return out / "report.md"


# ------------------------------------------------------------------------------------------------
# What the report says: a list of blocks, rendered to Markdown and to HTML


def _title(compared: Sequence[runs.Run]) -> str:
    return f"ettin report: {' vs '.join(r.name for r in compared)}"


def _what_it_is(compared: Sequence[runs.Run]) -> str:
    a, b = compared[:2]
    if len(compared) > 2:
        return (f"a comparison of {len(compared)} runs (labelled by run name): each run's data and schedule "
                "are checked against A's, and the scores are tested pair by pair")
    return ("an encoder/decoder pair" if a.kind != b.kind else
            f"an A/B comparison of two {a.kind}s (labelled by run name)")


def report_blocks(compared: Sequence[runs.Run], out: Path, evaluation: Optional[dict],
                  evaluation_sources: Sequence[str], *, max_steps: int) -> list[tuple]:
    """The report of two or three runs (``compared``, A first)."""
    a = compared[0]
    paths = " ".join(str(r.path) for r in compared)
    blocks: list[tuple] = [("h1", _title(compared))]
    who = "; ".join(f"{letter} = {r.label} at {r.path.resolve()}" for letter, r in zip(LETTERS, compared))
    blocks.append(("p", f"{who}. This is {_what_it_is(compared)}. Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}."))
    blocks.append(("table", runs_table(*compared)))

    for letter, other in zip(LETTERS[1:], compared[1:]):
        checks = identity.identity_checks(a, other, max_steps=max_steps)
        blocks.append(("h2", "Data and schedule identity" + (f": A vs {letter}" if len(compared) > 2 else "")))
        blocks.append(("p", identity_verdict(checks)))
        blocks.append(("table", identity.checks_table(checks).rename(columns={"B": letter})))

    blocks.append(("h2", "Evaluation"))
    evaluation, weights, refused = scores.current_scores(evaluation, compared)
    if refused:
        blocks.append(("p", scores.refused_warning(refused, f"python -m ettin.eval {paths} "
                                                            f"--out {out} (and --checkpoints ... for checkpoints)")))
    if len(weights):
        blocks.append(("p", "The weights each run's scores were computed from (eval.json's provenance), "
                            "against the run's latest checkpoint:"))
        blocks.append(("table", weights))
    over_training = scores.checkpoint_scores(evaluation, compared)
    every = EVERY[len(compared)]
    if evaluation is None:
        blocks.append(("p", f"No evaluation found (looked for eval.json in {every} run folders, in "
                            f"{out} and in {out / CHECKPOINT_EVAL}). Evaluate {every} with: python -m ettin.eval "
                            f"{paths}, then pass the file with --eval."))
    else:
        if scores.is_smoke(evaluation):
            blocks.append(("p", f"WARNING: {SMOKE_WARNING}"))
        blocks += pair_scores(evaluation, evaluation_sources, compared, out, checkpoints_only=len(over_training) > 0
                              and not scores.has_pair_scores(evaluation, [r.name for r in compared]))
    blocks += scores_over_training(over_training, compared, out)

    blocks.append(("h2", "Training curves"))
    objectives = list(dict.fromkeys(r.objective for r in compared))
    if len(objectives) > 1:
        blocks.append(("p", f"Each loss is its own objective's ({' vs '.join(o.upper() for o in objectives)}): "
                            "compare how the curves move, not their levels. "
                            "Phase boundaries are dotted; tokens are cumulative over phases."))
    blocks.append(image(plots.plot_losses(compared), out, "loss.png", "train and validation loss"))
    blocks.append(("table", final_losses(*compared)))
    blocks.append(image(plots.plot_schedule(compared), out, "schedule.png",
                         "learning rate and global batch"))
    blocks.append(image(plots.plot_throughput(compared), out, "throughput.png", "throughput"))
    return blocks


UNCERTAINTY_NOTE = (
    f"± is one standard error (eval.json's stderr_method names how each was made: lm-eval's own stderr, the same "
    f"formula over examples or queries, or a bootstrap of {uncertainty.BOOTSTRAP_RESAMPLES} resamples); the bars of "
    f"the figure are 95% intervals. A - B is tested on the same examples (McNemar exact for accuracy, a paired "
    f"bootstrap otherwise; an unpaired z-test where per-example results are missing): a winner is named (★) only "
    f"when p < {uncertainty.LEVEL}, else the difference is within noise.")


def pair_scores(evaluation: dict, sources: Sequence[str], compared: Sequence[runs.Run], out: Path, *,
                checkpoints_only: bool) -> list[tuple]:
    """The final models' scores side by side, each pair's test and winner and the paper's direction: for two
    runs one table, for three the scores in one table and the tests pair by pair (A vs B, A vs C, B vs C)
    in another."""
    names = [r.name for r in compared]
    if checkpoints_only:
        return [("p", f"Only checkpoints were evaluated (from {', '.join(sources)}); the final models' scores "
                      f"side by side need: python -m ettin.eval {' '.join(str(r.path) for r in compared)}.")]
    kinds = {r.kind for r in compared}
    text = (f"Suite {evaluation.get('suite')!r}, created {evaluation.get('created')}, from "
            f"{', '.join(sources)}. {UNCERTAINTY_NOTE} The Ettin paper found encoders ahead on "
            "classification and retrieval and decoders ahead on generation; 'agrees' is filled only for "
            "a decided winner."
            + ("" if len(kinds) > 1 else f" {EVERY[len(compared)].capitalize()} runs are the same kind, so the "
               "paper's direction is not tested here."))
    if len(compared) == 2:
        table = scores.score_table(evaluation, *names)
        shown = [pd.concat([_scores_for_display(table, names), _tests_for_display(table)], axis=1)]
    else:
        table = scores.side_by_side(evaluation, names)
        shown = [_scores_for_display(table, names), _pairwise_for_display(evaluation, names)]
    return [("p", text), *(("table", t) for t in shown),
            image(plots.plot_scores(table, names), out, "scores.png",
                  "evaluation scores with 95% intervals" + (", decided winner starred" if len(compared) == 2 else ""))]


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


def runs_table(*compared: runs.Run) -> pd.DataFrame:
    rows = {}
    for key, run in zip(LETTERS, compared):
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


def final_losses(*compared: runs.Run) -> pd.DataFrame:
    rows = []
    for phase in dict.fromkeys(p for run in compared for p in run.phases):
        row = {"phase": phase}
        for run in compared:
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


def _scores_for_display(table: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """``score ± stderr`` per model (★ on a decided winner, where the table names one: a pair's), of
    ``scores.score_table`` or ``scores.side_by_side``."""
    shown = pd.DataFrame({"task": table["task"], "category": table["category"], "metric": table["metric"],
                          "better": ["higher" if h else "lower" for h in table["higher_is_better"]]})
    winners = table["winner"] if "winner" in table else [None] * len(table)
    for letter, name in zip(scores.LETTERS, names):
        shown[name] = [_with_error(s, e) + (" ★" if w == name else "")
                       for s, e, w in zip(table[f"score_{letter}"], table[f"stderr_{letter}"], winners)]
    return shown


def _tests_for_display(table: pd.DataFrame) -> pd.DataFrame:
    """A pair's test (``scores.score_table``): the difference with its 95% interval, the p-value, the test
    that decided, the winner and the paper's direction."""
    shown = pd.DataFrame(index=table.index)
    shown["A - B [95% interval]"] = ["-" if d is None or pd.isna(d) else f"{d:+.4g} [{ci[0]:+.3g}, {ci[1]:+.3g}]"
                                     for d, ci in zip(table["difference"], table["difference_ci95"])]
    shown["p"] = [_p_value(p) for p in table["p_value"]]
    shown["test"] = ["-" if pd.isna(t) else t for t in table["test"]]
    shown["winner"] = table["winner"]
    shown["Ettin paper"] = table["paper"]
    shown["agrees"] = table["agrees"]
    return shown


def _pairwise_for_display(evaluation: dict, names: Sequence[str]) -> pd.DataFrame:
    """Every pair of the models tested task by task (A vs B, A vs C, B vs C), one row per task and pair."""
    tables = []
    for name_a, name_b in itertools.combinations(names, 2):
        table = scores.score_table(evaluation, name_a, name_b)
        pair = pd.DataFrame({"task": table["task"], "metric": table["metric"], "A": name_a, "B": name_b})
        tables.append(pd.concat([pair, _tests_for_display(table)], axis=1))
    return pd.concat(tables, ignore_index=True)
