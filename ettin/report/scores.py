"""``eval.json`` files (format ``ettin-eval/1``) as tables: two models side by side, with Ettin's
finding per task category beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

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


CHECKPOINT_COLUMNS = ["run", "checkpoint", "total_tokens", "task", "category", "metric", "higher_is_better",
                      "score"]


def checkpoint_scores(evaluation: Optional[dict], runs: Sequence[Run]) -> pd.DataFrame:
    """Every score of the runs' checkpoints in the evaluation, at each checkpoint's cumulative token count
    (the loss plots' axis). ``python -m ettin.eval RUN --checkpoints ...`` names a checkpoint's model
    ``RUN@CHECKPOINT``; models of checkpoints the run no longer has are left out (no token count)."""
    rows = []
    models = (evaluation or {}).get("models", {})
    for run in runs:
        for checkpoint in run.checkpoints:
            for task, result in models.get(f"{run.name}@{checkpoint.path.name}", {}).get("tasks", {}).items():
                rows.append([run.name, checkpoint.path.name, checkpoint.total_tokens, task, result.get("category"),
                             result.get("metric"), bool(result.get("higher_is_better", True)), result["score"]])
    table = pd.DataFrame(rows, columns=CHECKPOINT_COLUMNS)
    order = {run.name: position for position, run in enumerate(runs)}  # the runs in the order given
    return table.sort_values(["task", "run", "total_tokens"], key=lambda column: column.map(order)
                             if column.name == "run" else column, kind="stable", ignore_index=True)


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


