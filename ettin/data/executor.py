"""``python -m ettin.data.prepare ... executor=local|slurm tasks=N``: preparation on datatrove.

Stage 1 runs ``tasks`` datatrove tasks (``LocalPipelineExecutor`` here, ``SlurmPipelineExecutor``
on a cluster: tasks x workers, ``skip_completed``, so a relaunch runs only the tasks that did not
finish; on Slurm, nor those still queued or running: ettin/data/slurm_jobs.py). Task t reads the input in its fixed order and tokenizes and chunks the units (groups of
documents, the same as a local preparation's) with number u % tasks == t, writing their samples
with ``MDSWriter`` into ``<output>.parts/task-<t>/`` and what each unit held into a manifest. A task
starts by removing what an earlier, killed attempt of it left, so nothing is written twice.

Stage 2, the dependent merge step (a second datatrove executor with ``depends=`` stage 1, one
task), feeds the units back in input order to the very writer a local preparation uses: the output
folder has the same shards, bytes, lengths and summary (but for timings and ``num_proc``) as
``executor=none``, whatever the number of tasks. Then the parts are removed.

Every task reads the whole input (only tokenizing its share): tokenization dominates the cost, so
this scales while reading stays cheap; for inputs where reading is the cost, split them into folders
prepared separately (a mixture takes several folders). On a Spark cluster, streaming's
``dataframe_to_mds`` is the alternative (docs/data.md).
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ettin.data.files import file_lock
from ettin.store.fs import publish, temp_path
from ettin.data.shards import (SPLITS, PrepareConfig, UnitResult, _encoded_writer, _init_worker,
                               _tokenize_unit, columns_for, document_units, sample_dtype,
                               worker_settings, write_folder)
from ettin.data.reading import Skips

MANIFEST = "manifest.json"


def parts_dir(output: Path) -> Path:
    return output.with_name(f"{output.name}.parts")


class TokenizeTask:
    """Stage 1, one datatrove task: the units u with u % world_size == rank."""

    def __init__(self, cfg: PrepareConfig, output: Path) -> None:
        self.cfg, self.output = cfg, output

    def __call__(self, data=None, rank: int = 0, world_size: int = 1):
        from ettin.data.tokenizer import load_tokenizer

        work = parts_dir(self.output)
        tokenizer = load_tokenizer(work / "tokenizer")
        final = work / f"task-{rank:05d}"
        shutil.rmtree(final, ignore_errors=True)  # a relaunched task starts over: nothing twice
        temp = temp_path(final)
        shutil.rmtree(temp, ignore_errors=True)
        _init_worker(str(work / "tokenizer" / "tokenizer.json"), worker_settings(self.cfg, tokenizer))
        skips, units, number = Skips(), [], -1
        columns = columns_for(sample_dtype(tokenizer))
        size_limit = self.cfg.shard_size_mb << 20
        writers = {s: _encoded_writer(columns=columns, out=str(temp / s), size_limit=size_limit)
                   for s in SPLITS}
        for number, unit in enumerate(document_units(self.cfg, skips)):
            if number % world_size != rank:
                continue
            result = _tokenize_unit(unit)
            for split in SPLITS:
                for sample in result.samples[split]:
                    writers[split].write(sample)
            units.append({"unit": number,
                          "lengths": {s: result.lengths[s].tolist() for s in SPLITS},
                          "doc_ids": {s: result.doc_ids[s].tolist() for s in SPLITS},
                          "documents": result.documents})
        for writer in writers.values():
            writer.finish()
        manifest = {"units": units, "unit_count": number + 1, "skips": asdict(skips)}
        (temp / MANIFEST).write_text(json.dumps(manifest))
        publish(temp, final)


def input_counts(work: Path, tasks: int) -> dict:
    """The unit count and the skip lists of the input, from every task's manifest. Every task reads
    the whole input (tokenizing only its share), so they must all have seen the same; tasks that
    disagree read an input that changed between them, and their parts cannot be merged."""
    seen = {}
    for task in range(tasks):
        manifest = json.loads((work / f"task-{task:05d}" / MANIFEST).read_text())
        seen[task] = {"unit_count": manifest["unit_count"], "skips": manifest["skips"]}
    differing = [t for t in seen if seen[t] != seen[0]]
    if differing:
        from ettin.data.reading import PrepareError

        raise PrepareError(
            f"tasks {', '.join(map(str, differing))} saw another input than task 0 (units and skipped "
            f"documents/files: {seen[differing[0]]} vs {seen[0]}): the input changed while the tasks "
            f"read it. Delete {work} and prepare again from an input that stays put.")
    return seen[0]


def merged_units(work: Path, tasks: int):
    """Stage 2's input: every task's units, in input order, as ``UnitResult``s."""
    from streaming.base.stream import Stream
    from streaming.base.world import World

    def task_units(task: int) -> Iterator[UnitResult]:
        folder = work / f"task-{task:05d}"
        manifest = json.loads((folder / MANIFEST).read_text())
        readers = {s: Stream(local=str(folder), split=s).get_shards(World(1, 1, 1, 0), False)
                   for s in SPLITS}
        samples = {s: (r.get_sample_data(i) for r in readers[s] for i in range(r.samples))
                   for s in SPLITS}
        for unit in manifest["units"]:
            yield UnitResult(
                samples={s: [next(samples[s]) for _ in unit["lengths"][s]] for s in SPLITS},
                lengths={s: np.asarray(unit["lengths"][s], dtype=np.int32) for s in SPLITS},
                doc_ids={s: np.asarray(unit["doc_ids"][s], dtype=np.int64) for s in SPLITS},
                documents=[tuple(d) for d in unit["documents"]])

    def results(skips: Skips) -> Iterator[UnitResult]:
        counted = input_counts(work, tasks)
        skips.documents.update(counted["skips"]["documents"])
        skips.files.update(counted["skips"]["files"])
        skips.rows.update(counted["skips"].get("rows", {}))
        streams = [task_units(t) for t in range(tasks)]
        for number in range(counted["unit_count"]):
            yield next(streams[number % tasks])

    return results


class MergeTask:
    """Stage 2, one task: the prepared folder from the parts, then the parts removed."""

    def __init__(self, cfg: PrepareConfig, settings: dict, output: Path) -> None:
        self.cfg, self.settings, self.output = cfg, settings, output

    def __call__(self, data=None, rank: int = 0, world_size: int = 1):
        from ettin.data.tokenizer import load_tokenizer

        work = parts_dir(self.output)
        tokenizer = load_tokenizer(work / "tokenizer")
        with file_lock(self.output.with_name(self.output.name + ".lock")):
            write_folder(self.cfg, tokenizer, self.settings, self.output,
                         merged_units(work, self.cfg.tasks))
        shutil.rmtree(work, ignore_errors=True)


def sbatch_options(text: Optional[str]) -> dict[str, str]:
    """``sbatch_args``: sbatch options separated by spaces, each ``name=value``, ``--name=value`` or
    ``--flag`` (values may hold commas: ``"exclude=n1,n2 --qos=high"``), as datatrove's dict."""
    from ettin.data.reading import PrepareError

    options = {}
    for option in shlex.split(text or ""):
        name, _, value = option.lstrip("-").partition("=")
        if not name:
            raise PrepareError(f"sbatch_args={text!r}: {option!r} names no option; give sbatch options "
                               "separated by spaces, e.g. sbatch_args=\"exclude=n1,n2 --qos=high\"")
        options[name] = value
    return options


def this_venv_activate() -> Optional[str]:
    """The activate script of the virtual environment this process runs in, if any: datatrove's jobs
    call its ``launch_pickled_pipeline`` by name, which a job finds only with the same environment
    active (a user may run ``.venv/bin/python -m ettin.data.prepare`` without activating it)."""
    activate = Path(sys.prefix) / "bin" / "activate"
    return str(activate) if sys.prefix != sys.base_prefix and activate.is_file() else None


def run_executor(cfg: PrepareConfig, tokenizer, settings: dict, output: Path) -> None:
    """Run (local) or submit (slurm) both stages."""
    work = parts_dir(output)
    previous = work / "settings.json"
    if previous.is_file() and json.loads(previous.read_text()) != {**settings, "tasks": cfg.tasks}:
        shutil.rmtree(work)  # parts of other settings: start over
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tokenizer" / "tokenizer.json").is_file():
        tokenizer.save_pretrained(str(work / "tokenizer"))
    previous.write_text(json.dumps({**settings, "tasks": cfg.tasks}))
    if cfg.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        tokenize = LocalPipelineExecutor([TokenizeTask(cfg, output)], tasks=cfg.tasks, workers=cfg.workers,
                                         logging_dir=str(work / "logs" / "tokenize"),
                                         skip_completed=True)
        tokenize.run()
        # The merge step, here: this process already holds the output's lock.
        write_folder(cfg, tokenizer, settings, output, merged_units(work, cfg.tasks))
        shutil.rmtree(work, ignore_errors=True)
        return
    from ettin.data.reading import PrepareError
    from ettin.data.slurm_jobs import RelaunchSafeSlurmExecutor

    if not cfg.partition:
        raise PrepareError("executor=slurm needs partition=NAME")
    options = sbatch_options(cfg.sbatch_args)
    common = dict(partition=cfg.partition, time=cfg.time, cpus_per_task=cfg.cpus_per_task,
                  mem_per_cpu_gb=cfg.mem_per_cpu_gb, skip_completed=True,
                  qos=options.pop("qos", "normal"),  # datatrove writes its own qos line last
                  sbatch_args=options or None, job_name=f"ettin-prepare-{output.name}",
                  venv_path=this_venv_activate())
    tokenize = RelaunchSafeSlurmExecutor([TokenizeTask(cfg, output)], tasks=cfg.tasks,
                                         logging_dir=str(work / "logs" / "tokenize"), **common)
    merge = RelaunchSafeSlurmExecutor([MergeTask(cfg, settings, output)], tasks=1, depends=tokenize,
                                      logging_dir=str(work / "logs" / "merge"), **common)
    merge.run()  # submits the tokenize job first (depends), then the merge job after it
    print(f"submitted: {cfg.tasks} tokenize tasks, then a merge task; logs in {work / 'logs'}; "
          f"{output} appears when the merge job ends (run the same command again to resume)")
