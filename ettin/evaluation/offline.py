"""Compute nodes without internet: fill the standard Hugging Face caches on a login node
(``python -m ettin.eval --prefetch --tasks ettin-paper MODEL...``), then evaluate with
``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1``: ``datasets`` and lm-eval read the same caches.

The caches are the libraries' own (``HF_HOME``, ``HF_DATASETS_CACHE``, ``HF_HUB_CACHE``); nothing here
writes a format of its own. Offline, every dataset a task needs is opened from the cache before any
model runs, so a missing one is one error naming its id, config and the prefetch command.
"""

from __future__ import annotations

import logging
import os
from ettin.evaluation.models import EvalError
from ettin.evaluation.registry import LM_EVAL, Dataset, Task, lm_eval_index

log = logging.getLogger("ettin")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def is_offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")  # huggingface_hub's rule
               for v in OFFLINE_VARIABLES)


def task_datasets(task: Task) -> tuple[Dataset, ...]:
    """The hub datasets ``task`` loads: the registry's, or (an lm-eval task not registered in ettin)
    the ``dataset_path``/``dataset_name`` of lm-eval's task yaml."""
    if task.datasets or task.smoke or task.library != LM_EVAL:
        return task.datasets
    return lm_eval_datasets(task.name)


def lm_eval_datasets(name: str) -> tuple[Dataset, ...]:
    """(dataset_path, dataset_name) of an lm-eval task's yaml, includes resolved; () for a group."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = lm_eval_index()[name]
    config = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else {}
    if not config.get("dataset_path"):
        return ()
    return (Dataset(config["dataset_path"], config.get("dataset_name")),)


def prefetch_command(tasks: list[Task], models: list[str]) -> str:
    return f"python -m ettin.eval --prefetch --tasks {','.join(t.name for t in tasks)} {' '.join(models)}".rstrip()


def _load(dataset: Dataset):
    from datasets import load_dataset

    return load_dataset(dataset.id, dataset.config, revision=dataset.revision)


def check_cached(tasks: list[Task], models: list[str]) -> None:
    """Offline: open every dataset of ``tasks`` from the ``datasets`` cache; a missing one is an error
    naming it and the command that fills the cache. (An mteb benchmark's datasets are mteb's: one it
    cannot read is reported the same way when its task runs.)"""
    for task in tasks:
        for dataset in task_datasets(task):
            try:
                _load(dataset)
            except Exception as error:  # datasets raises ConnectionError, FileNotFoundError or its own
                raise EvalError(
                    f"task {task.name}: dataset {dataset.id!r} (config {dataset.config!r}) is not in the "
                    f"datasets cache ({os.environ.get('HF_DATASETS_CACHE') or 'HF_HOME/datasets'}) and "
                    f"HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; on a machine with internet and the same "
                    f"HF_HOME run: {prefetch_command(tasks, models)}  ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''})") from None


def prefetch(tasks: list[Task], models: list[str]) -> list[str]:
    """Download every dataset of ``tasks`` and every hub model of ``models`` into the standard caches;
    return what was fetched, one line each."""
    if is_offline():
        raise EvalError("--prefetch downloads; unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE and run it on a "
                        "machine with internet")
    from ettin.evaluation.models import split_revision
    from ettin.model.hub import resolve_folder

    fetched = []
    for dataset in dict.fromkeys(d for t in tasks for d in task_datasets(t)):
        data = _load(dataset)
        fetched.append(f"dataset {dataset}: {', '.join(f'{k} {len(v)}' for k, v in data.items())}")
    for benchmark in dict.fromkeys(t.mteb_benchmark for t in tasks if t.mteb_benchmark):
        from ettin.evaluation.runners import mteb_benchmark_tasks

        for mteb_task in mteb_benchmark_tasks(benchmark):
            mteb_task.load_data()  # mteb downloads its own datasets, each at the revision it pins
            dataset = mteb_task.metadata.dataset
            fetched.append(f"mteb {benchmark} {mteb_task.metadata.name}: {dataset['path']} @ {dataset.get('revision')}")
    for spec in models:
        name, revision = split_revision(spec)
        fetched.append(f"model {spec}: {resolve_folder(name, revision=revision)}")
    return fetched
