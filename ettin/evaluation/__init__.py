"""Evaluate encoders and decoders on the same tasks, through the field's libraries, into eval.json.

    evaluate(["runs/smoke-encoder", "runs/smoke-decoder"], tasks="offline", out=Path("runs/eval"))

Tasks come from the registry (ettin.evaluation.registry): the offline smoke suite (generated, no
network), the Ettin paper's suite (``ettin-paper``), any registered task, or any lm-eval task.
eval.json (format ``ettin-eval/1``, docs/evaluation.md) records how each score was made and what it
was made from (its ``provenance``: ettin.evaluation.provenance); it is published atomically after every
task, and a rerun with the same ``out`` reuses a score only when its provenance is the same.

Importing this package registers ettin's lm-eval models: ``ettin-mlm`` (ettin.evaluation.masked_lm),
``ettin-mdlm`` (ettin.evaluation.diffusion_lm) and ``ettin-prefix`` (ettin.evaluation.prefix_lm).

May import: ettin.model.modernbert, ettin.objectives, ettin.data, ettin.store; nothing of training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Optional, TextIO

import numpy as np

from ettin.evaluation import diffusion_lm  # noqa: F401  registers "ettin-mdlm" with lm-eval
from ettin.evaluation import masked_lm  # noqa: F401  registers "ettin-mlm" with lm-eval
from ettin.evaluation import prefix_lm  # noqa: F401  registers "ettin-prefix" with lm-eval
from ettin.evaluation import smoke_tasks, uncertainty
from ettin.evaluation.models import EvalError, EvalModel, resolve_models
from ettin.evaluation.offline import check_cached, is_offline, prefetch_command
from ettin.evaluation.provenance import library_versions, model_provenance, task_provenance, why_not_reused
from ettin.evaluation.registry import (LM_EVAL, MTEB, PAPER_RETRIEVAL, SENTENCE_TRANSFORMERS,
                                       TRANSFORMERS, Task, resolve_tasks, suite_name)
from ettin.evaluation.runners import (MsmarcoSettings, RetrievalSettings, finetune_classification, harness_model,
                                      harness_model_args, msmarco_finetune, mteb_benchmark_tasks, mteb_queries,
                                      mteb_task, mteb_task_score, paper_retrieval_encoder, retrieval_ndcg_at_10,
                                      run_harness_task)
from ettin.evaluation.stopping import Stopped
from ettin.store.fs import write_text

log = logging.getLogger("ettin")

FORMAT = "ettin-eval/1"  # fields were added since, none changed: readers of /1 read it
LOG_FILE = "eval.log"
# The libraries whose own output (logging, progress bars, warnings) goes to eval.log, not the console.
LIBRARY_LOGGERS = ("transformers", "datasets", "lm-eval", "lm_eval", "sentence_transformers", "accelerate",
                   "huggingface_hub", "torch", "mteb", "ettin", "py.warnings")


def _library_version(library: str) -> str:
    return version({LM_EVAL: "lm_eval", TRANSFORMERS: "transformers", SENTENCE_TRANSFORMERS: "sentence-transformers",
                    MTEB: "mteb"}[library])


# ---------------------------------------------------------------------------------------------------
# Each kind of task


def _harness_examples(samples: list[dict], metric: str) -> Optional[dict]:
    """The per-example results (ettin.evaluation.uncertainty) of one lm-eval metric: a number per example
    is a mean's; a (loglikelihood, words) pair per example is ``weighted_perplexity``'s; a (reference, prediction) pair
    per example is corpus chrF's; none else."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    values = [sample.get(metric) for sample in ordered]
    index = [sample["doc_id"] for sample in ordered]
    if all(isinstance(v, (int, float, bool)) for v in values):
        return {"index": index, "statistic": uncertainty.MEAN, "value": [float(v) for v in values]}
    if metric == "word_perplexity" and all(isinstance(v, (tuple, list)) and len(v) == 2 for v in values):
        return {"index": index, "statistic": uncertainty.WORD_PERPLEXITY,
                "loglikelihood": [float(v[0]) for v in values], "weight": [float(v[1]) for v in values]}
    if metric == "chrf" and all(isinstance(v, (tuple, list)) and len(v) == 2 for v in values):
        return {"index": index, "statistic": uncertainty.CHRF, "reference": [str(v[0]) for v in values],
                "prediction": [v[1] if isinstance(v[1], str) else str(v[1][0]) for v in values]}
    return None


def _harness_result(task: Task, model: EvalModel, lm, suite_dir: Optional[Path], limit: Optional[int],
                    seed: int) -> dict:
    scored = run_harness_task(lm, task.name, include_path=suite_dir, limit=limit, few_shot=task.few_shot, seed=seed)
    metrics = scored.metrics
    args = harness_model_args(model)
    # Scored through the MDLM bound: a Monte Carlo estimate, with its samples and standard error.
    bound = {}
    if args["model"] == "ettin-mdlm" and lm.stderrs:  # this task's requests (a generation task has none)
        bound = {"bound_samples": args["samples"], "bound_mean_stderr": lm.mean_stderr()}
        lm.stderrs.clear()
    if task.category == "language_modeling":
        metric = ("word_perplexity" if args["model"] in ("hf", "ettin-prefix") else
                  "word_perplexity_bound" if bound else "pseudo_word_perplexity")
        lm_eval_metric = "word_perplexity"
    else:
        metric = task.metric if task.metric in metrics else next((m for m in ("acc_norm", "acc") if m in metrics),
                                                                 sorted(metrics)[0])
        lm_eval_metric = metric
    return {"metric": metric, "score": metrics[lm_eval_metric], "n_examples": scored.n_examples,
            "model_args": args, "examples": _harness_examples(scored.samples, lm_eval_metric),
            **bound}


def _glue_rows(task: Task, limit: Optional[int]) -> tuple[list[dict], list[dict]]:
    """The full training split and the evaluation split (``limit``: 4 x limit and limit rows)."""
    from datasets import load_dataset

    (dataset,) = task.datasets
    data = load_dataset(dataset.id, dataset.config)
    first, second = task.text_columns

    def rows(part, cap: Optional[int]) -> list[dict]:
        part = part.select(range(min(len(part), cap))) if cap else part
        return [{"text": r[first], **({"text_pair": r[second]} if second else {}), "label": r["label"]}
                for r in part]

    train = data[task.train_split].shuffle(seed=0) if limit else data[task.train_split]
    return rows(train, 4 * limit if limit else None), rows(data[task.split], limit)


def _classification_examples(task: Task, gold: list, predicted: list) -> dict:
    """The per-example results of a fine-tuned classifier's predictions (ettin.evaluation.uncertainty)."""
    index = list(range(len(gold)))
    if task.metric in (uncertainty.MATTHEWS, uncertainty.SPEARMAN):
        return {"index": index, "statistic": task.metric, "predicted": predicted, "gold": gold}
    return {"index": index, "statistic": uncertainty.MEAN, "value": [float(p == g) for p, g in zip(predicted, gold)]}


def _metric(task: Task, gold: list) -> Callable[[list], float]:
    if task.metric == "matthews_correlation":  # GLUE's metric for CoLA
        from sklearn.metrics import matthews_corrcoef

        return lambda predicted: float(matthews_corrcoef(gold, predicted))
    if task.metric == "spearman":  # STS-B (bert24's SpearmanCorrCoef)
        from scipy.stats import spearmanr

        return lambda predicted: float(spearmanr(gold, predicted).statistic)
    return lambda predicted: sum(p == g for p, g in zip(predicted, gold)) / len(gold)


def _classification(task: Task, model: EvalModel, suite_dir: Optional[Path], limit: Optional[int], seed: int,
                    work: Path, learning_rates: Optional[tuple[float, ...]]) -> dict:
    if task.smoke:
        data = json.loads((suite_dir / f"{smoke_tasks.NLI}.json").read_text())
        first, second = task.text_columns
        train, evaluation = ([{"text": r[first], "text_pair": r[second], "label": r["label"]} for r in part]
                             for part in (data["train"], data["test"]))
    else:
        train, evaluation = _glue_rows(task, limit)
    grid = replace(task.grid, learning_rates=learning_rates) if learning_rates else task.grid
    gold = [r["label"] for r in evaluation]
    metric, predictions = _metric(task, gold), []  # each setting's predictions, in the order tried
    sweep = finetune_classification(model, train, evaluation, num_labels=task.num_labels, settings=grid.settings(),
                                    score=lambda predicted: predictions.append(predicted) or metric(predicted),
                                    seed=seed, work_dir=work / "finetune" / model.name.replace("/", "--") / task.name)
    best = max(sweep, key=lambda tried: tried["score"])
    chosen = sweep.index(best)
    return {"metric": task.metric, "score": best["score"], "n_examples": len(evaluation),
            "n_train_examples": len(train), "sweep": sweep, "chosen": chosen,
            "selection": f"best {task.metric} on the {task.split} split over the sweep",
            "examples": _classification_examples(task, gold, predictions[chosen]) if predictions else None}


def _msmarco_pool(limit: Optional[int]) -> dict:
    """MS MARCO v1.1 the small way (not the paper's protocol): (query, selected passage) pairs of the
    training split to fine-tune; validation queries ranked among the passages retrieved for all of them."""
    from datasets import load_dataset

    data = load_dataset("microsoft/ms_marco", "v1.1")
    train_rows = 4 * limit if limit else 20_000
    train, queries, corpus, relevant = [], {}, {}, {}
    for row in data["train"].select(range(min(len(data["train"]), train_rows))):
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


def _msmarco_encoder(model: EvalModel, limit: Optional[int], seed: int, work: Path) -> tuple[object, int]:
    """The model fine-tuned as the paper's retrieval script does (and the rows it saw), made once per
    model and --limit and kept in ``work``: the MS MARCO and MTEB tasks evaluate the same one."""
    from datasets import load_dataset
    from sentence_transformers import SentenceTransformer

    folder = work / "retrieval" / model.name.replace("/", "--") / f"msmarco-finetuned-{limit or 'full'}"
    if (folder / "trained_rows.txt").exists():
        return SentenceTransformer(str(folder)), int((folder / "trained_rows.txt").read_text())
    triplets = PAPER_RETRIEVAL.datasets[0]
    encoder = paper_retrieval_encoder(model)
    settings = MsmarcoSettings()
    trained = msmarco_finetune(encoder, load_dataset(triplets.id, triplets.config, split="train"), settings=settings,
                               train_rows=4 * limit if limit else settings.train_rows, seed=seed,
                               work_dir=folder.with_name(folder.name + "-trainer"))
    encoder.save(str(folder))
    write_text(folder / "trained_rows.txt", f"{trained}\n")
    return encoder, trained


def _paper_retrieval(task: Task, model: EvalModel, limit: Optional[int], seed: int, work: Path) -> dict:
    """The paper's MS MARCO fine-tune, then one mteb task (MS MARCO dev, MLDR, CodeSearchNet): its main
    score on the task's split, the mean over the subsets scored (CodeSearchNet's six languages)."""
    encoder, trained = _msmarco_encoder(model, limit, seed, work)
    evaluated = mteb_task(task.mteb_task, task.split, task.mteb_subsets)
    score, scores = mteb_task_score(encoder, evaluated)
    by_subset = {subset["hf_subset"]: subset for subset in scores[task.split]}
    cutoffs = [k for k in next(iter(by_subset.values())) if k.startswith(("ndcg_at", "recall_at", "mrr_at"))]
    return {"metric": task.metric, "score": score, "n_examples": mteb_queries(evaluated, task.split),
            "n_train_examples": trained, "settings": vars(MsmarcoSettings()),
            # documents and queries are cut at the encoder's length (the model's own maximum, as the
            # paper's script leaves it): MLDR's documents are long, so it matters there
            "max_seq_length": encoder.max_seq_length, "mteb_task": task.mteb_task,
            "mteb_version": version("mteb"),
            "mteb_subsets": {name: subset["main_score"] for name, subset in by_subset.items()},
            "mteb_scores": {k: sum(s[k] for s in by_subset.values()) / len(by_subset) for k in cutoffs}}


def _mteb_benchmark(task: Task, model: EvalModel, limit: Optional[int], seed: int, work: Path) -> dict:
    """The MS MARCO fine-tuned model on every task of an mteb benchmark: the mean main score, the mean per
    task type (the paper's clustering and retrieval columns) and every task's score."""
    encoder, trained = _msmarco_encoder(model, limit, seed, work)
    scores, types = {}, {}
    for member in mteb_benchmark_tasks(task.mteb_benchmark):
        name = member.metadata.name
        try:
            scores[name] = mteb_task_score(encoder, member)[0]
        except Exception as error:
            if not is_offline():
                raise
            dataset = member.metadata.dataset
            raise EvalError(f"task {task.name}: mteb task {name} could not read its dataset {dataset['path']!r} "
                            f"(revision {dataset.get('revision')!r}) offline ({type(error).__name__}: {error}); on a "
                            f"machine with internet and the same HF_HOME run: "
                            f"{prefetch_command([task], [str(model.path)])}") from None
        types.setdefault(member.metadata.type, []).append(scores[name])
    return {"metric": task.metric, "score": sum(scores.values()) / len(scores), "n_examples": len(scores),
            "mean_by_type": {kind: sum(values) / len(values) for kind, values in sorted(types.items())},
            "task_scores": scores, "n_train_examples": trained, "mteb_benchmark": task.mteb_benchmark}


def _retrieval(task: Task, model: EvalModel, suite_dir: Optional[Path], limit: Optional[int], seed: int,
               work: Path, settings: RetrievalSettings) -> dict:
    if task.mteb_task:
        return _paper_retrieval(task, model, limit, seed, work)
    data = (json.loads((suite_dir / f"{smoke_tasks.RETRIEVAL}.json").read_text()) if task.smoke
            else _msmarco_pool(limit))
    score, per_query = retrieval_ndcg_at_10(model, data["train"], data["queries"], data["corpus"], data["relevant"],
                                            settings=settings, seed=seed,
                                            work_dir=work / "retrieval" / model.name.replace("/", "--") / task.name)
    order = list(data["queries"])  # a query's index: its position in the task's queries
    return {"metric": task.metric, "score": score, "n_examples": len(data["queries"]),
            "n_train_examples": len(data["train"]), "settings": vars(settings),
            "examples": {"index": [order.index(q) for q in per_query], "statistic": uncertainty.MEAN,
                         "value": list(per_query.values())}}


# ---------------------------------------------------------------------------------------------------
# The console gets one line per model and task; the libraries' own output goes to eval.log


@contextlib.contextmanager
def _file_descriptors_to(log_file: TextIO):
    """Point the process's stdout and stderr file descriptors at ``log_file`` (what subprocesses and
    C extensions write, e.g. lm-eval asking git for a commit hash)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    try:
        yield
    finally:
        log_file.flush()
        for fd, original in zip((1, 2), saved):
            os.dup2(original, fd)
            os.close(original)


@contextlib.contextmanager
def _library_output_to(log_path: Path):
    """Send stdout, stderr (Python's and the file descriptors), warnings and the libraries' loggers to
    ``log_path`` for the block."""
    import transformers

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log_file, contextlib.redirect_stdout(log_file), \
            contextlib.redirect_stderr(log_file), _file_descriptors_to(log_file):
        handler = logging.StreamHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        saved = {}
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            saved[name] = (logger.handlers[:], logger.propagate, logger.level)
            logger.handlers, logger.propagate = [handler], False
            logger.setLevel(logging.INFO)
        transformers.utils.logging.disable_progress_bar()
        logging.captureWarnings(True)
        try:
            yield
        finally:
            logging.captureWarnings(False)
            transformers.utils.logging.enable_progress_bar()
            for name, (handlers, propagate, level) in saved.items():
                logger = logging.getLogger(name)
                logger.handlers, logger.propagate = handlers, propagate
                logger.setLevel(level)


# ---------------------------------------------------------------------------------------------------
# evaluate()


def _model_entry(model: EvalModel) -> dict:
    return {"path": str(model.path), "kind": model.kind, "objective": model.objective,
            "parameters": model.parameters, "ettin_size": model.ettin_size, "tasks": {}}


def _previous_report(out: Optional[Path]) -> dict:
    """The eval.json of an interrupted or earlier run in ``out`` (its finished tasks may be reused). One
    that cannot be read (a crash of something else, a truncated copy) is moved aside with a warning."""
    path = out / "eval.json" if out else None
    if path is None or not path.exists():
        return {}
    try:
        report = json.loads(path.read_text())
        if not isinstance(report, dict):
            raise ValueError(f"a JSON {type(report).__name__}, not an object")
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        aside = path.with_name(f"{path.name}.damaged-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}")
        os.replace(path, aside)
        print(f"warning: {path} is damaged ({type(error).__name__}: {error}); moved it to {aside} and "
              "evaluating every task again", file=sys.stderr)
        return {}
    return report if report.get("format") == FORMAT else {}


def evaluate(models: list[str | Path], tasks: str | list[str] = "offline", out: Optional[Path] = None,
             limit: Optional[int] = None, seed: int = 0, *, learning_rates: Optional[tuple[float, ...]] = None,
             retrieval: RetrievalSettings = RetrievalSettings(), console: Optional[TextIO] = None,
             checkpoints: Optional[str] = None) -> dict:
    """Evaluate every model on every task; return the eval.json dict (and write ``out/eval.json`` after
    each task; a rerun with the same ``out`` keeps the tasks already scored for the same model folder).

    ``limit``: examples per task (the offline suite is generated at that size: ``SuiteSize.limited``;
    the others are capped). ``learning_rates`` replaces the fine-tuning grid's learning rates. One line
    per model and task goes to ``console`` (default stdout); the libraries' output to ``out/eval.log``.
    ``checkpoints`` (``all``, ``every:K`` or names): evaluate those checkpoints of each run directory."""
    task_list = resolve_tasks(tasks)
    if is_offline():
        check_cached(task_list, [str(m) for m in models])
    evaluated = resolve_models(list(models), checkpoints)
    console = console or sys.stdout
    if out is None:  # the generated tasks and fine-tuning scratch live only as long as the call
        with tempfile.TemporaryDirectory(prefix="ettin-eval-") as scratch:
            return _evaluate(evaluated, task_list, tasks, Path(scratch), None, limit, seed, learning_rates,
                             retrieval, console)
    return _evaluate(evaluated, task_list, tasks, Path(out), Path(out), limit, seed, learning_rates, retrieval,
                     console)


def _evaluate(evaluated: list[EvalModel], task_list: list[Task], spec: str | list[str], work: Path,
              out: Optional[Path], limit: Optional[int], seed: int, learning_rates: Optional[tuple[float, ...]],
              retrieval: RetrievalSettings, console: TextIO) -> dict:
    previous = _previous_report(out)
    report = {"format": FORMAT, "suite": suite_name(spec),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "models": {}}
    suite_dir = None
    if any(t.smoke for t in task_list):
        size = smoke_tasks.SuiteSize.limited(limit) if limit else smoke_tasks.SuiteSize()
        suite_dir = smoke_tasks.generate(work / "offline-tasks", seed=seed, size=size)
    for model in evaluated:
        entry = report["models"][model.name] = _model_entry(model)
        done = previous.get("models", {}).get(model.name, {})
        identity = model_provenance(model)  # the weights hashed once per model and evaluation
        lm = None
        for task in task_list:
            provenance = {**identity, "task": task_provenance(task, limit=limit, seed=seed,
                                                                learning_rates=learning_rates,
                                                                retrieval_settings=retrieval),
                          "versions": library_versions(task)}
            stored = done.get("tasks", {}).get(task.name)
            why = why_not_reused(stored, provenance)
            if why is None:
                entry["tasks"][task.name] = stored
                print(f"{model.name}  {task.name}: already in eval.json (same weights, tokenizer, settings and "
                      "versions), not rerun", file=console)
                continue
            if stored is not None:
                print(f"{model.name}  {task.name}: evaluated again: {why}", file=console)
            started = time.perf_counter()
            try:
                with _library_output_to(work / LOG_FILE):
                    if task.library == LM_EVAL:
                        lm = lm or harness_model(model)
                        result = _harness_result(task, model, lm, suite_dir, limit, seed)
                    elif task.library == TRANSFORMERS:
                        result = _classification(task, model, suite_dir, limit, seed, work, learning_rates)
                    elif task.library == MTEB:
                        result = _mteb_benchmark(task, model, limit, seed, work)
                    else:
                        result = _retrieval(task, model, suite_dir, limit, seed, work, retrieval)
            except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM under sigterm_as_interrupt
                raise Stopped(f"evaluating {model.name} on {task.name}", interrupt) from None
            seconds = time.perf_counter() - started
            result.update(_uncertainty(result, task, model, out))
            entry["tasks"][task.name] = {
                "category": task.category, "higher_is_better": task.higher_is_better, "smoke": task.smoke,
                "library": task.library, "library_version": _library_version(task.library),
                "split": task.split, "few_shot": task.few_shot, "seed": seed, "limit": limit,
                "source": task.source, "seconds": round(seconds, 1), **result, "provenance": provenance}
            error = f" ± {result['stderr']:.2g}" if result["stderr"] is not None else ""
            print(f"{model.name}  {task.name}{' (smoke)' if task.smoke else ''}: {result['metric']} "
                  f"{result['score']:.4g}{error} on {result['n_examples']} examples, {seconds:.0f} s", file=console)
            _write(_with_unreached(report, previous), out)
    _write(report, out)
    return report


EXAMPLES_DIR = "examples"  # beside eval.json: one .npz of per-example results per model and task
NO_ERROR = "not computed: {why}"


def _uncertainty(result: dict, task: Task, model: EvalModel, out: Optional[Path]) -> dict:
    """Take the runner's in-memory per-example results (and lm-eval's own stderr) out of ``result``; return
    the task record's ``stderr``, ``ci95``, ``stderr_method`` and ``per_example`` (the .npz file, relative to
    eval.json; None without ``out``)."""
    examples = result.pop("examples", None)
    if not examples:
        why = ("mteb gives ettin no per-query scores" if task.library == MTEB
               else "no per-example results for this metric")
        return {"stderr": None, "ci95": None, "stderr_method": NO_ERROR.format(why=why), "per_example": None}
    examples = {name: values if name == "statistic" else np.asarray(values) for name, values in examples.items()}
    unit = "queries" if task.category == "retrieval" else "examples"
    record = uncertainty.uncertainty(examples, result["score"], unit=unit)
    record["per_example"] = None
    if out is not None:
        relative = Path(EXAMPLES_DIR) / f"{model.name.replace('/', '--')}--{task.name}.npz"
        uncertainty.save_examples(out / relative, **examples)
        record["per_example"] = str(relative)
    return record


def _with_unreached(report: dict, previous: dict) -> dict:
    """``report`` so far, plus the earlier eval.json's scores of the models and tasks not reached yet:
    an evaluation stopped part way loses none of them (the rerun checks each one's provenance)."""
    models = {}
    for name, old in previous.get("models", {}).items():
        new = report["models"].get(name)
        models[name] = old if new is None else {**new, "tasks": {**old.get("tasks", {}), **new["tasks"]}}
    return {**report, "models": {**models, **{n: m for n, m in report["models"].items() if n not in models}}}


def _write(report: dict, out: Optional[Path]) -> None:
    if out is not None:
        write_text(out / "eval.json", json.dumps(report, indent=2) + "\n")
