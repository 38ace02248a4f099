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
# Data and schedule identity


