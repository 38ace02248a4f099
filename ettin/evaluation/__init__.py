"""Evaluate encoders and decoders on the same tasks, through the field's libraries, into eval.json.

    evaluate(["runs/smoke-encoder", "runs/smoke-decoder"], tasks="offline", out=Path("runs/eval"))

Tasks: the offline smoke suite (ettin.evaluation.suite; generated, no network), or online: any
lm-eval task (hellaswag, arc_easy, ...), GLUE tasks via ``datasets`` (fine-tuned), ``msmarco``
(fine-tuned retrieval). ``tasks="standard"`` is Ettin's list. eval.json (format ``ettin-eval/1``):

    {"format", "suite", "created", "models": {NAME: {"path", "kind", "objective", "parameters",
      "tasks": {TASK: {"category", "metric", "score", "higher_is_better", "smoke", "n_examples",
                       "library"}}}}}

Importing this package registers the ``ettin-mlm`` lm-eval model (ettin.evaluation.masked_lm).

May import: ettin.model, ettin.objectives, ettin.data, ettin.store; nothing of training.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ettin.evaluation import masked_lm  # noqa: F401  registers "ettin-mlm" with lm-eval
from ettin.evaluation import suite
from ettin.evaluation.models import EvalError, EvalModel, resolve_models
from ettin.evaluation.runners import (FinetuneSettings, RetrievalSettings, finetune_classification,
                                      retrieval_ndcg_at_10, run_harness)

log = logging.getLogger("ettin")

FORMAT = "ettin-eval/1"
CATEGORIES = ("generation", "classification", "retrieval", "language_modeling")

# Ettin's generative tasks (lm-eval names) and the metric reported for each.
GENERATION_METRICS = {"hellaswag": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
                      "winogrande": "acc", "piqa": "acc_norm", "boolq": "acc", "lambada_openai": "acc",
                      "sciq": "acc_norm"}
# GLUE via datasets ("nyu-mll/glue"): (first text column, second or None, labels, evaluation split).
GLUE = {"mnli": ("premise", "hypothesis", 3, "validation_matched"), "qnli": ("question", "sentence", 2, "validation"),
        "qqp": ("question1", "question2", 2, "validation"), "rte": ("sentence1", "sentence2", 2, "validation"),
        "mrpc": ("sentence1", "sentence2", 2, "validation"), "sst2": ("sentence", None, 2, "validation"),
        "cola": ("sentence", None, 2, "validation")}
MSMARCO = "msmarco"
OFFLINE = list(suite.TASKS)
STANDARD = [*GENERATION_METRICS, *GLUE, MSMARCO]
ONLINE_TRAIN_EXAMPLES = 20_000  # fine-tuning sets of the online tasks are capped here (or 4 x limit)


@dataclass(frozen=True)
class TaskResult:
    category: str
    metric: str
    score: float
    higher_is_better: bool
    smoke: bool
    n_examples: int
    library: str


def task_list(tasks: str | list[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = {"offline": OFFLINE, "standard": STANDARD}.get(tasks) or [t for t in tasks.split(",") if t]
    if not tasks:
        raise EvalError("no tasks given: use --tasks offline, standard, or a comma-separated list")
    return list(dict.fromkeys(tasks))


def _check_online(tasks: list[str]) -> None:
    online = [t for t in tasks if t not in OFFLINE]
    if online and any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")  # huggingface_hub's rule
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise EvalError(f"task(s) {', '.join(online)} download data from the Hugging Face hub, but "
                        "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; unset it, or use --tasks offline")


def _harness_result(task: str, model: EvalModel, metrics: dict[str, float], n: int) -> TaskResult:
    smoke = task in OFFLINE
    if "word_perplexity" in metrics:  # a loglikelihood_rolling task
        name = "word_perplexity" if model.is_decoder else "pseudo_word_perplexity"
        return TaskResult("language_modeling", name, metrics["word_perplexity"], False, smoke, n, "lm-eval")
    metric = GENERATION_METRICS.get(task) or next((m for m in ("acc_norm", "acc") if m in metrics), None)
    if metric is None:
        metric = sorted(metrics)[0]
    return TaskResult("generation", metric, metrics[metric], True, smoke, n, "lm-eval")


def _glue_rows(task: str, limit: Optional[int]) -> tuple[list[dict], list[dict], int]:
    from datasets import load_dataset

    first, second, labels, split = GLUE[task]
    data = load_dataset("nyu-mll/glue", task)

    def rows(part, cap: Optional[int]) -> list[dict]:
        part = part.select(range(min(len(part), cap))) if cap else part
        return [{"text": r[first], **({"text_pair": r[second]} if second else {}), "label": r["label"]}
                for r in part]

    return (rows(data["train"].shuffle(seed=0), 4 * limit if limit else ONLINE_TRAIN_EXAMPLES),
            rows(data[split], limit), labels)


def _msmarco(limit: Optional[int]) -> dict:
    """MS MARCO v1.1 passage ranking, the small way: (query, selected passage) pairs of the training
    split to fine-tune; validation queries ranked among the passages retrieved for all of them."""
    from datasets import load_dataset

    data = load_dataset("microsoft/ms_marco", "v1.1")
    train, queries, corpus, relevant = [], {}, {}, {}
    for row in data["train"].select(range(min(len(data["train"]), 4 * limit if limit else ONLINE_TRAIN_EXAMPLES))):
        selected = [p for p, s in zip(row["passages"]["passage_text"], row["passages"]["is_selected"]) if s]
        if selected:
            train.append({"query": row["query"], "passage": selected[0]})
    for row in data["validation"].select(range(min(len(data["validation"]), limit or 1000))):
        qid = f"q{row['query_id']}"
        passages = row["passages"]
        for j, (text, selected) in enumerate(zip(passages["passage_text"], passages["is_selected"])):
            corpus[f"{qid}-{j}"] = text
            if selected:
                relevant.setdefault(qid, []).append(f"{qid}-{j}")
        if qid in relevant:
            queries[qid] = row["query"]
    return {"train": train, "queries": queries, "corpus": corpus, "relevant": relevant}


def _accuracy(predicted: list[int], rows: list[dict]) -> float:
    return sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)


def _classification(task: str, model: EvalModel, suite_dir: Optional[Path], limit: Optional[int],
                    seed: int, work: Path, settings: FinetuneSettings) -> TaskResult:
    if task == suite.NLI:
        data = json.loads((suite_dir / f"{suite.NLI}.json").read_text())
        convert = [{"text": r["premise"], "text_pair": r["hypothesis"], "label": r["label"]}
                   for r in data["train"] + data["test"]]
        train, test, labels = convert[:len(data["train"])], convert[len(data["train"]):], len(data["labels"])
    else:
        train, test, labels = _glue_rows(task, limit)
    predicted = finetune_classification(model, train, test, num_labels=labels, settings=settings, seed=seed,
                                        work_dir=work / "finetune" / model.name / task)
    if task == "cola":  # GLUE's metric for CoLA
        from sklearn.metrics import matthews_corrcoef

        score, metric = float(matthews_corrcoef([r["label"] for r in test], predicted)), "matthews_correlation"
    else:
        score, metric = _accuracy(predicted, test), "accuracy"
    return TaskResult("classification", metric, score, True, task in OFFLINE, len(test), "transformers")


def _retrieval(task: str, model: EvalModel, suite_dir: Optional[Path], limit: Optional[int], seed: int,
               work: Path, settings: RetrievalSettings) -> TaskResult:
    data = (json.loads((suite_dir / f"{suite.RETRIEVAL}.json").read_text()) if task == suite.RETRIEVAL
            else _msmarco(limit))
    score = retrieval_ndcg_at_10(model, data["train"], data["queries"], data["corpus"], data["relevant"],
                                 settings=settings, seed=seed, work_dir=work / "retrieval" / model.name / task)
    return TaskResult("retrieval", "ndcg@10", score, True, task in OFFLINE, len(data["queries"]),
                      "sentence-transformers")


def evaluate(models: list[str | Path], tasks: str | list[str] = "offline", out: Optional[Path] = None,
             limit: Optional[int] = None, seed: int = 0, *, finetune: FinetuneSettings = FinetuneSettings(),
             retrieval: RetrievalSettings = RetrievalSettings()) -> dict:
    """Evaluate every model on every task; return the eval.json dict (and write ``out/eval.json``).

    ``limit``: examples per task (the offline suite is generated at that size: ``SuiteSize.limited``;
    online tasks are capped). The offline tasks are smoke tasks (``"smoke": true``)."""
    names = task_list(tasks)
    _check_online(names)
    evaluated = resolve_models(list(models))
    if out is None:  # the generated tasks and fine-tuning scratch live only as long as the call
        with tempfile.TemporaryDirectory(prefix="ettin-eval-") as scratch:
            return _evaluate(evaluated, names, tasks, Path(scratch), limit, seed, finetune, retrieval)
    report = _evaluate(evaluated, names, tasks, Path(out), limit, seed, finetune, retrieval)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _evaluate(evaluated: list[EvalModel], names: list[str], tasks: str | list[str], work: Path,
              limit: Optional[int], seed: int, finetune: FinetuneSettings, retrieval: RetrievalSettings) -> dict:
    suite_dir = None
    if set(names) & set(OFFLINE):
        size = suite.SuiteSize.limited(limit) if limit else suite.SuiteSize()
        suite_dir = suite.generate(work / "offline-tasks", seed=seed, size=size)
    harness_tasks = [t for t in names if t not in GLUE and t not in (suite.NLI, suite.RETRIEVAL, MSMARCO)]
    report = {"format": FORMAT, "suite": tasks if isinstance(tasks, str) and tasks in ("offline", "standard")
              else "custom", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "models": {}}
    for model in evaluated:
        log.info("evaluating %s (%s, %s)", model.name, model.kind, model.path)
        results: dict[str, TaskResult] = {}
        if harness_tasks:
            for task, (metrics, n) in run_harness(model, harness_tasks, include_path=suite_dir,
                                                  limit=limit, seed=seed).items():
                results[task] = _harness_result(task, model, metrics, n)
        for task in names:
            if task in GLUE or task == suite.NLI:
                results[task] = _classification(task, model, suite_dir, limit, seed, work, finetune)
            elif task in (suite.RETRIEVAL, MSMARCO):
                results[task] = _retrieval(task, model, suite_dir, limit, seed, work, retrieval)
        report["models"][model.name] = {
            "path": str(model.path), "kind": model.kind, "objective": model.objective,
            "parameters": model.parameters, "tasks": {t: asdict(results[t]) for t in names}}
    return report


__all__ = ["evaluate", "EvalError", "FinetuneSettings", "RetrievalSettings", "task_list", "FORMAT"]
