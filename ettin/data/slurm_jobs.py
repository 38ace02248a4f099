"""``executor=slurm`` relaunched while its earlier jobs are still queued or running.

datatrove skips the tasks whose completion marker exists, but a task that is queued or running has
none yet: a plain relaunch submits it again, and the duplicate starts by removing what the running
one is writing. Here each stage records the jobs it submitted (``submitted_jobs.json`` in its logging
folder: the job ids, in submission order, and the ranks each array element runs), and a relaunch asks
``squeue`` which of them are still queued or running; those ranks are not submitted again, and the
next stage waits for them as well as for the new ones. A job pending on a dependency that can never
be satisfied (an earlier task of it failed) will never run: it is cancelled and its ranks run again.
Without ``squeue`` (not on a Slurm login node) every unfinished task is submitted, as datatrove does.
"""

from __future__ import annotations

import getpass
import json
import math
import shutil
import subprocess
from pathlib import Path

from datatrove.executor import SlurmPipelineExecutor
from datatrove.executor.slurm import default_job_id_retriever

SUBMITTED = "submitted_jobs.json"
NEVER_RUNS = "DependencyNeverSatisfied"


class RecordingJobIds:
    """datatrove's job id retriever, which also appends each id to ``path`` (one per line): datatrove
    submits a stage's arrays in order (array k runs ranks from k * max_array_size) and then its stats
    job, and keeps only the last id."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, sbatch_output: str) -> str:
        job_id = default_job_id_retriever(sbatch_output, job_id_position=-1)
        with open(self.path, "a") as ids:
            ids.write(f"{job_id}\n")
        return job_id


class RelaunchSafeSlurmExecutor(SlurmPipelineExecutor):
    """A datatrove Slurm stage whose relaunch submits only the tasks neither done nor still queued or
    running (see the module's docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.job_id_retriever = RecordingJobIds(self.logging_dir.resolve_paths("new_job_ids"))
        self.active_ranks: dict[int, str] = {}  # rank -> the array job that queues or runs it

    def get_incomplete_ranks(self, ranks=None, skip_completed=None) -> list[int]:
        incomplete = super().get_incomplete_ranks(ranks, skip_completed)
        return [rank for rank in incomplete if rank not in self.active_ranks]

    def launch_job(self) -> None:
        folder = Path(self.logging_dir.resolve_paths(""))
        folder.mkdir(parents=True, exist_ok=True)
        submitted = json.loads((folder / SUBMITTED).read_text()) if (folder / SUBMITTED).is_file() else []
        self.active_ranks = queued_or_running(submitted)
        new_ids = folder / "new_job_ids"
        new_ids.unlink(missing_ok=True)
        super().launch_job()
        if new_ids.is_file():
            ranks = json.loads((folder / "ranks_to_run.json").read_text())
            arrays = math.ceil(len(ranks) / self.tasks_per_job / self.max_array_size) \
                if self.max_array_size != -1 else 1
            ids = new_ids.read_text().split()[:arrays]  # the stats job comes after the arrays
            submitted.append({"jobs": ids, "ranks": ranks, "max_array_size": self.max_array_size,
                              "tasks_per_job": self.tasks_per_job})
            (folder / SUBMITTED).write_text(json.dumps(submitted))
            new_ids.unlink()
        waiting = sorted(set(self.active_ranks.values()))
        if waiting:  # a stage depending on this one also waits for the jobs still queued or running
            self.job_id = ":".join(waiting + ([str(self.job_id)] if self.job_id not in (None, -1) else []))


def queued_or_running(submitted: list[dict]) -> dict[int, str]:
    """Of the ranks of ``submitted`` launches, those queued or running now: rank -> array job id."""
    if not submitted or shutil.which("squeue") is None:
        return {}
    listing = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%F|%K|%r"],
                             capture_output=True, text=True, check=True).stdout
    where = {job: (launch, offset) for launch in submitted for offset, job in enumerate(launch["jobs"])}
    active: dict[int, str] = {}
    for line in listing.splitlines():
        job, index, reason = line.strip().split("|")
        if job not in where or not index.isdigit():
            continue
        if reason == NEVER_RUNS:
            subprocess.run(["scancel", job], check=False)
            continue
        launch, offset = where[job]
        first = (offset * launch["max_array_size"] + int(index)) * launch["tasks_per_job"]
        for rank in launch["ranks"][first:first + launch["tasks_per_job"]]:
            active[rank] = job
    return active
