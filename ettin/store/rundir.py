"""A run directory: every path of a run, and the one answer to "is this a run directory?".

    RUN_DIR = <output_dir>/<run_name>/
      config.yaml                the resolved config of the last start
      LOCK                       the process training in it (RunLock)
      train.log, slurm.log       the training's log; the Slurm job's output (appended on requeue)
      launch.sbatch              the job script python -m ettin.launch rendered and submitted
      slurm_job                  the Slurm job (array task: <job>_<index>) last submitted for the run
      tokenizer/                 the run's copy of its tokenizer (checkpoints point at it)
      checkpoints/<phase>-step<7 digits>-tok<15 digits>/   (ettin.store.checkpoints)
      logs/<phase>/metrics.csv   train rows and the validation curve, one continuous file per phase
      hf/, hf-<phase>/           Hugging Face exports of the run's end and of each phase's end
      hf-checkpoints/<name>/     exports of single checkpoints for evaluation over training
      wandb/                     the wandb logger's files

Nothing else in ettin spells these names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ettin.store import checkpoints as ckpt
from ettin.store.fs import create_exclusive, pid_alive


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: Path | str) -> None:
        object.__setattr__(self, "path", Path(path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @staticmethod
    def is_run(path: Path | str) -> bool:
        """Whether ``path`` is a run directory (it has a checkpoints folder or a config.yaml)."""
        path = Path(path)
        return (path / "checkpoints").is_dir() or (path / "config.yaml").is_file()

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def lock(self) -> Path:
        return self.path / "LOCK"

    @property
    def train_log(self) -> Path:
        return self.path / "train.log"

    @property
    def slurm_log(self) -> Path:
        return self.path / "slurm.log"

    @property
    def launch_script(self) -> Path:
        return self.path / "launch.sbatch"

    @property
    def slurm_job(self) -> Path:
        return self.path / "slurm_job"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def checkpoints(self) -> Path:
        return ckpt.checkpoints_dir(self.path)

    def checkpoint(self, phase: str, step: int, tokens: int) -> Path:
        return self.checkpoints / ckpt.checkpoint_name(phase, step, tokens)

    def list_checkpoints(self) -> list[Path]:
        return ckpt.list_checkpoints(self.path)

    def latest_checkpoint(self) -> Optional[Path]:
        return ckpt.latest_checkpoint(self.path)

    def metrics(self, phase: str) -> Path:
        return self.path / "logs" / phase / "metrics.csv"

    def metrics_files(self) -> list[Path]:
        return sorted((self.path / "logs").glob("*/metrics.csv"))

    def export(self, phase: Optional[str] = None) -> Path:
        """The Hugging Face export of the run's end (``hf``) or of a phase's end (``hf-<phase>``)."""
        return self.path / ("hf" if phase is None else f"hf-{phase}")

    def checkpoint_export(self, checkpoint_name: str) -> Path:
        """Where ``python -m ettin.eval RUN --checkpoints`` exports one checkpoint (kept for reuse)."""
        return self.path / "hf-checkpoints" / checkpoint_name

    @staticmethod
    def of_export(folder: Path | str) -> Optional["RunDir"]:
        """The run an export folder (``RUN/hf`` or ``RUN/hf-<phase>``) belongs to, if it is one."""
        folder = Path(folder)
        if (folder.name == "hf" or folder.name.startswith("hf-")) and RunDir.is_run(folder.parent):
            return RunDir(folder.parent)
        return None

    def holds_a_run(self) -> Optional[Path]:
        """Something showing a run already trained here (a checkpoint or a metrics file), or None."""
        found = self.list_checkpoints() or self.metrics_files()
        return found[-1] if found else None




class RunLockedError(RuntimeError):
    """Another live process trains in this run directory."""


class RunLock:
    """``RUN_DIR/LOCK`` holds the PID, host, SLURM job and incarnation of the process training in the
    run. Created exclusively with its content in one step (:func:`create_exclusive`), so two processes
    starting at once cannot both get it and no reader ever sees it empty.

    A second process refuses to start, naming the holder. A lock is taken over only when its holder
    is certainly gone:

    - the holder is on this host and its PID is not alive; or
    - the holder is an earlier incarnation of this same SLURM job (its ``SLURM_RESTART_COUNT`` is
      lower than ours). Slurm ends every process of a job before it requeues it, so that holder is
      gone wherever it ran, even if the requeued job lands on another node (where its PID cannot be
      checked) or on the same node where its PID has been reused.

    The same job in the same incarnation is not enough: that is another step of this very job (an
    ``srun`` launched twice into one run directory), alive on another node or, if its PID lives, on
    this one. A lock that cannot be read was not written by a RunLock (they are never empty or
    partial): it is refused rather than guessed at, and the message says to delete it."""

    def __init__(self, run_dir: Path | str) -> None:
        self.path = RunDir(run_dir).lock
        self.held = False
        self.taken_over: Optional[dict] = None  # the stale holder this lock replaced, if any

    def _me(self) -> dict:
        import socket
        import time

        return {"pid": os.getpid(), "host": socket.gethostname(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
                "started": time.time()}

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = self._me()
        for _ in range(3):
            if create_exclusive(self.path, json.dumps(me)):
                self.held = True
                return self
            holder = self._holder()
            if holder is None:
                raise RunLockedError(
                    f"{self.path} exists but cannot be read as a run lock (an ettin lock is never "
                    f"empty or partial), so whether a process trains in {self.path.parent} is "
                    f"unknown. If no process trains there, delete {self.path} and start again."
                )
            if not self._stale(holder, me):
                job = holder.get("slurm_job_id")
                raise RunLockedError(
                    f"{self.path.parent} is in use: process {holder['pid']} on {holder['host']}"
                    f"{' (SLURM job ' + job + ')' if job else ''}"
                    f" is training in it. Wait for it to finish, stop it, or use another run_name; if "
                    f"that process is gone, delete {self.path}."
                )
            if holder.get("pid") != me["pid"]:
                self.taken_over = holder
            self.path.unlink(missing_ok=True)
        raise RunLockedError(f"could not take {self.path}; delete it if no run uses {self.path.parent}")

    def _holder(self) -> Optional[dict]:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) and "pid" in holder and "host" in holder else None

    @staticmethod
    def _stale(holder: dict, me: dict) -> bool:
        same_host = holder["host"] == me["host"]
        if same_host and holder["pid"] == me["pid"]:
            return True  # this process (a pair's second run, or a finished earlier call)
        if (me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]
                and int(holder.get("slurm_restart_count") or 0) < me["slurm_restart_count"]):
            return True  # an earlier incarnation of this requeued job: Slurm ended it
        return same_host and not pid_alive(int(holder["pid"]))

    def release(self) -> None:
        if self.held and (self._holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
