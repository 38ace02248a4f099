"""``eval.json`` files (format ``ettin-eval/1``) as tables: two or three models side by side, each pair
tested, with Ettin's finding per task category beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ettin.evaluation import uncertainty
from ettin.report.runs import Run, RunError


EVAL_FORMAT = "ettin-eval/1"
# What the Ettin paper found, per task category, for an encoder/decoder pair of one size.
PAPER_DIRECTION = {"classification": "encoder", "retrieval": "encoder", "generation": "decoder"}


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
            data = _with_absolute_examples(data, path.parent)
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


def _with_absolute_examples(data: dict, folder: Path) -> dict:
    """``data`` with each task's ``per_example`` file (written relative to its eval.json) made absolute."""
    if not isinstance(data.get("models"), dict):
        return data
    models = {}
    for name, model in data["models"].items():
        tasks = {task: ({**result, "per_example": str(folder / result["per_example"])}
                        if isinstance(result, dict) and result.get("per_example") else result)
                 for task, result in (model.get("tasks") or {}).items()} if isinstance(model, dict) else None
        models[name] = {**model, "tasks": tasks} if tasks is not None else model
    return {**data, "models": models}


def _same_examples(a: dict, b: dict) -> bool:
    """Whether two task results were scored on the same examples (same split, seed and limit: the
    offline tasks are generated from the seed)."""
    return all(a.get(key) == b.get(key) for key in ("split", "seed", "limit", "n_examples"))


def compare_results(a: dict, b: dict) -> Optional[dict]:
    """The test of two task results (ettin.evaluation.uncertainty): paired on their per-example files when
    both have one on the same examples, else unpaired from their standard errors; None when either has
    no standard error."""
    paths = [Path(r["per_example"]) if r.get("per_example") else None for r in (a, b)]
    if all(p is not None and p.is_file() for p in paths) and _same_examples(a, b):
        examples = [uncertainty.load_examples(p) for p in paths]
        if np.array_equal(examples[0]["index"], examples[1]["index"]):
            return uncertainty.paired_comparison(*examples)
    if a.get("stderr") is None or b.get("stderr") is None:
        return None
    return uncertainty.unpaired_comparison(a["score"], a["stderr"], b["score"], b["stderr"])


WITHIN_NOISE = "within noise"


def decided_winner(comparison: Optional[dict], name_a: str, name_b: str, higher_is_better: bool) -> str:
    """``name_a``, ``name_b``, "within noise" (p >= LEVEL) or "not tested (no standard error)"."""
    if comparison is None:
        return "not tested (no standard error)"
    if comparison["p_value"] >= uncertainty.LEVEL or comparison["difference"] == 0:
        return WITHIN_NOISE
    return name_a if (comparison["difference"] > 0) == higher_is_better else name_b


def is_smoke(evaluation: Optional[dict]) -> bool:
    """True when any task is a smoke task (or the suite is the offline one that ships with ettin)."""
    if not evaluation:
        return False
    if evaluation.get("suite") == "offline":
        return True
    return any(task.get("smoke") for model in evaluation["models"].values()
               for task in model.get("tasks", {}).values())


LETTERS = "abc"  # the runs' column suffixes in the order given: score_a, score_b, score_c


def side_by_side(evaluation: Optional[dict], names: Sequence[str]) -> pd.DataFrame:
    """Per task of any of the models: its category, metric (the models' metrics joined by "/" where they
    differ) and direction, and each model's score, standard
    error and 95% interval (``score_a``, ``stderr_a``, ``ci95_a`` for the first name, ``_b``, ``_c`` for the
    next; NaN score where a model lacks the task); ``smoke`` when any of them is a smoke task."""
    letters = LETTERS[:len(names)]
    columns = ["task", "category", "metric", "higher_is_better",
               *[f"{column}_{letter}" for letter in letters for column in ("score", "stderr", "ci95")], "smoke"]
    if not evaluation:
        return pd.DataFrame(columns=columns)
    models = evaluation["models"]
    missing = [n for n in names if n not in models]
    if missing:
        raise RunError(f"the evaluation has no results for {', '.join(missing)} (it holds "
                       f"{', '.join(models) or 'no model'}); evaluate with python -m ettin.eval "
                       f"{' '.join(names)}")
    tasks = [models[name].get("tasks", {}) for name in names]
    rows = []
    for task in sorted(set().union(*tasks)):
        results = [own.get(task) for own in tasks]
        first = next(r for r in results if r)
        metrics = "/".join(dict.fromkeys(str(r.get("metric")) for r in results if r))  # e.g. a pseudo-perplexity beside a perplexity
        row = [task, first.get("category"), metrics, bool(first.get("higher_is_better", True))]
        for result in results:
            row += [result["score"], result.get("stderr"), result.get("ci95")] if result else \
                [float("nan"), None, None]
        rows.append(row + [any(bool(r and r.get("smoke")) for r in results)])
    return pd.DataFrame(rows, columns=columns)


TEST_COLUMNS = ["difference", "difference_ci95", "p_value", "test", "winner", "paper", "agrees"]


def score_table(evaluation: Optional[dict], name_a: str, name_b: str) -> pd.DataFrame:
    """Per task: both scores with their standard errors and 95% intervals (``side_by_side``), the test of their
    difference (A - B, its 95% interval and p-value, the test's name), the winner it decides (or "within
    noise"), what the Ettin paper found for the task's category and whether this pair agrees (only for a
    decided winner)."""
    table = side_by_side(evaluation, [name_a, name_b])
    columns = [*table.columns[:-1], *TEST_COLUMNS, "smoke"]
    if not evaluation:
        return pd.DataFrame(columns=columns)
    a, b = (evaluation["models"][name] for name in (name_a, name_b))
    kinds = {name_a: a.get("kind"), name_b: b.get("kind")}
    # The paper compared an encoder with a decoder; a pair of any other kinds (two encoders, a prefix LM)
    # does not test its finding.
    paired = set(kinds.values()) == {"encoder", "decoder"}
    tests = []
    for task, category, higher in zip(table["task"], table["category"], table["higher_is_better"]):
        ta, tb = a.get("tasks", {}).get(task), b.get("tasks", {}).get(task)
        comparison = None
        if not (ta and tb):
            winner = "not evaluated on both"
        elif ta.get("metric") != tb.get("metric"):
            winner = f"not comparable ({ta.get('metric')} vs {tb.get('metric')})"
        else:
            comparison = compare_results(ta, tb)
            winner = decided_winner(comparison, name_a, name_b, higher)
        expected = PAPER_DIRECTION.get(category)
        if expected is None:
            paper = "-"
        elif kinds[name_a] == kinds[name_b]:
            paper = f"{expected}s (not tested: both are {kinds[name_a]}s)"
        elif not paired:
            paper = f"{expected}s (not tested: {kinds[name_a]} vs {kinds[name_b]})"
        else:
            paper = f"{expected}s ahead"
        if winner in (name_a, name_b) and expected and paired:
            agrees = "yes" if kinds[winner] == expected else "no"
        else:
            agrees = "-"
        comparison = comparison or {}
        tests.append([comparison.get("difference"), comparison.get("difference_ci95"), comparison.get("p_value"),
                      comparison.get("test"), winner, paper, agrees])
    return pd.concat([table, pd.DataFrame(tests, columns=TEST_COLUMNS, index=table.index)], axis=1)[columns]


CHECKPOINT_COLUMNS = ["run", "checkpoint", "total_tokens", "task", "category", "metric", "higher_is_better",
                      "score", "stderr", "phase"]


def checkpoint_scores(evaluation: Optional[dict], runs: Sequence[Run]) -> pd.DataFrame:
    """Every score (and its standard error, None where not recorded) of the runs' checkpoints in the
    evaluation, at each checkpoint's cumulative token count (the loss plots' axis). ``python -m ettin.eval RUN
    --checkpoints ...`` names a checkpoint's model ``RUN@CHECKPOINT``; models of checkpoints the run no longer
    has are left out (no token count)."""
    rows = []
    models = (evaluation or {}).get("models", {})
    for run in runs:
        for checkpoint in run.checkpoints:
            for task, result in models.get(f"{run.name}@{checkpoint.path.name}", {}).get("tasks", {}).items():
                rows.append([run.name, checkpoint.path.name, checkpoint.total_tokens, task, result.get("category"),
                             result.get("metric"), bool(result.get("higher_is_better", True)), result["score"],
                             result.get("stderr"), checkpoint.phase])
    table = pd.DataFrame(rows, columns=CHECKPOINT_COLUMNS)
    order = {run.name: position for position, run in enumerate(runs)}  # the runs in the order given
    return table.sort_values(["task", "run", "total_tokens"], key=lambda column: column.map(order)
                             if column.name == "run" else column, kind="stable", ignore_index=True)


NOISE_CHECKPOINTS = 3  # the last N evaluated checkpoints of a phase whose spread is a task's noise
SEPARATES = 2.0  # signal > SEPARATES x noise: the runs' difference stands out of the checkpoint noise


def checkpoint_noise(table: pd.DataFrame, runs: Sequence[Run], last: int = NOISE_CHECKPOINTS) -> pd.DataFrame:
    """Signal and noise over training (after AI2's "Signal and Noise", 2025), per task and phase: each run's
    noise is the standard deviation (n-1) of its scores at its last ``last`` evaluated checkpoints of the
    phase; the signal is the spread of the runs' means over those checkpoints (the largest minus the
    smallest; for a pair, |A - B|); the noise of that difference is the root sum of squares of the two
    runs' noises; a task separates the runs when signal > SEPARATES x noise. Phases where a run has fewer
    than two evaluated checkpoints are left out."""
    rows = []
    for (task, phase), points in table.groupby(["task", "phase"], sort=False):
        spreads, means = {}, {}
        for run in runs:
            scores = points[points["run"] == run.name].sort_values("total_tokens")["score"].tail(last)
            if len(scores) >= 2:
                spreads[run.name], means[run.name] = float(scores.std(ddof=1)), float(scores.mean())
        if len(spreads) < 2:
            continue
        high, low = max(means, key=means.get), min(means, key=means.get)
        signal = means[high] - means[low]
        noise = (spreads[high] ** 2 + spreads[low] ** 2) ** 0.5
        rows.append({"task": task, "phase": phase, "checkpoints": min(last, *(
            int((points["run"] == name).sum()) for name in spreads)),
            **{f"noise {name}": spread for name, spread in spreads.items()},
            "signal": signal, "noise of the difference": noise,
            "separates": "yes" if signal > SEPARATES * noise else "no"})
    return pd.DataFrame(rows)


def has_pair_scores(evaluation: Optional[dict], names: Sequence[str]) -> bool:
    """Whether the evaluation scores either run's final model (not only checkpoints)."""
    return bool(evaluation) and any(name in evaluation["models"] for name in names)


# ------------------------------------------------------------------------------------------------
# Which weights the scores came from


CURRENT, STALE, NOT_RECORDED = "current", "STALE", "not recorded"
WEIGHTS_COLUMNS = ["model", "checkpoint", "tokens", "weights sha256", "status"]


def _score_status(result: dict, checkpoint) -> tuple[str, str]:
    """Whether a task result was scored from ``checkpoint`` (a runs.Checkpoint, or None: the run has
    none): (status, why) by the checkpoint's name and the sha256 of its weights."""
    from ettin.store.checkpoints import checkpoint_identity

    provenance = result.get("provenance")
    if provenance is None:
        return NOT_RECORDED, "scored by an older ettin, which did not record the weights"
    scored = provenance.get("checkpoint")
    if checkpoint is None:
        return NOT_RECORDED, "the run has no checkpoint to compare with"
    now = checkpoint_identity(checkpoint.path)
    if scored is None:
        return STALE, f"not scored from a checkpoint of this run; its current one is {now['name']}"
    same_weights = None in (scored.get("weights_sha256"), now["weights_sha256"]) or \
        scored.get("weights_sha256") == now["weights_sha256"]
    if scored.get("name") == now["name"] and same_weights:
        return CURRENT, ""
    return STALE, (f"scored from {scored.get('name')} (weights {short(scored.get('weights_sha256'))}), the run's "
                   f"is {now['name']} (weights {short(now['weights_sha256'])})")


def short(sha: Optional[str]) -> str:
    return sha[:12] if sha else "not recorded"


def current_scores(evaluation: Optional[dict], runs: Sequence[Run]) -> tuple[Optional[dict], pd.DataFrame,
                                                                                list[str]]:
    """The evaluation without the scores whose weights are not the runs' current ones; a table of what
    each run's scores came from (its final model: the run's latest checkpoint); and one line per model
    whose scores were left out. A run's final model is named after the run, a checkpoint's
    ``RUN@CHECKPOINT`` (python -m ettin.eval RUN --checkpoints). Scores that record no provenance are
    kept and marked "not recorded"."""
    if not evaluation:
        return evaluation, pd.DataFrame(columns=WEIGHTS_COLUMNS), []
    models = {name: dict(model) for name, model in evaluation["models"].items()}
    rows, refused = [], []
    for run in runs:
        targets = {run.name: run.checkpoints[-1] if run.checkpoints else None,
                   **{f"{run.name}@{c.path.name}": c for c in run.checkpoints}}
        for name, checkpoint in targets.items():
            if name not in models:
                continue
            tasks = models[name].get("tasks", {})
            statuses = {task: _score_status(result, checkpoint) for task, result in tasks.items()}
            stale = [task for task, (status, _) in statuses.items() if status == STALE]
            if stale:
                refused.append(f"{name} ({', '.join(stale)}) {statuses[stale[0]][1]}")
            models[name]["tasks"] = {task: result for task, result in tasks.items() if task not in stale}
            if name != run.name:
                continue
            first = next(iter(tasks.values()), {}).get("provenance") or {}
            scored = first.get("checkpoint") or {}
            worst = next((s for s in (STALE, NOT_RECORDED) if any(v[0] == s for v in statuses.values())), CURRENT)
            why = next((v[1] for v in statuses.values() if v[0] == worst), "the run's latest checkpoint")
            rows.append([name, scored.get("name", "not recorded"),
                         f"{scored['tokens']:,}" if scored.get("tokens") is not None else "not recorded",
                         short(first.get("weights_sha256")),
                         f"{worst}: {why}" if why else worst])
    return {**evaluation, "models": models}, pd.DataFrame(rows, columns=WEIGHTS_COLUMNS), refused


def refused_warning(refused: Sequence[str], command: str) -> str:
    """The loud line of a report that leaves scores out."""
    return (f"WARNING: scores left out, not computed from the runs' current weights: {'; '.join(refused)}. "
            f"Evaluate again: {command}")


# ------------------------------------------------------------------------------------------------
# Data and schedule identity


