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
      hf-bidirectional/          a prefix LM exported as an encoder, for evaluation (ettin.evaluation.models)
      eval/                      python -m ettin.train's evaluation of a single run (pair=false): eval.json
      wandb/                     the wandb logger's files

Nothing else in ettin spells these names.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ettin.store import checkpoints as ckpt
from ettin.store.fs import create_exclusive, pid_alive, this_host, write_text


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

    def bidirectional_export(self) -> Path:
        """Where ``python -m ettin.eval RUN`` exports a model no transformers class computes (a prefix LM)
        as an encoder: its whole input as the prefix, for the fine-tuned tasks."""
        return self.path / "hf-bidirectional"

    def evaluation(self) -> Path:
        """Where ``python -m ettin.train pair=false`` evaluates the run at its end (eval.json, eval.log)."""
        return self.path / "eval"

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

    A holder on another host is never judged from this host's PID table: such a lock (outside the
    Slurm case) is refused, and the explicit override is to delete it, which the message says. The
    same job in the same incarnation is not enough either: that is another step of this very job (an
    ``srun`` launched twice into one run directory), alive on another node or, if its PID lives, on
    this one. A lock that cannot be read was not written by a RunLock (they are never empty or
    partial): it is refused rather than guessed at, and the message says to delete it.

    Taking over is a compare-and-swap built from the two operations that are atomic on local and
    shared (NFS, Lustre, GPFS) filesystems alike, an exclusive link() and a rename(): the taker first
    creates the claim ``.LOCK.takeover-<hash of the stale lock's bytes>`` exclusively (so of several
    processes that judged the same lock stale, one proceeds), re-reads LOCK and, only if it still
    holds those very bytes, renames its own finished lock over it; then it drops the claim. While the
    claim exists nothing else can change LOCK (its holder is gone, a new lock cannot be created over
    an existing one, and another takeover of those bytes needs the claim), so the re-read and the
    rename see the same lock. A taker that comes later finds either the claim (and waits for it) or
    a new lock (whose live holder it then refuses); it never deletes a lock it did not judge. flock()
    is not used: it is not honoured by every shared filesystem (Lustre without ``-o flock``) and
    would fail silently there. A process that dies between claim and rename (a few system calls)
    leaves the claim, which the next start names so a person can delete it."""

    # Tests set this to run code between reading a stale lock and taking it over (the race window).
    _before_takeover: Optional[Callable[[], None]] = None
    # How often, and how long apart, a start re-reads a lock that someone else is taking over.
    _attempts, _retry_s = 5, 0.2

    def __init__(self, run_dir: Path | str) -> None:
        self.path = RunDir(run_dir).lock
        self.held = False
        self.taken_over: Optional[dict] = None  # the stale holder this lock replaced, if any

    def _me(self) -> dict:
        import time

        return {"pid": os.getpid(), "host": this_host(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
                "started": time.time()}

    def acquire(self) -> "RunLock":
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = self._me()
        mine = json.dumps(me)
        claim: Optional[Path] = None
        for _ in range(self._attempts):
            if create_exclusive(self.path, mine):
                self.held = True
                return self
            try:
                seen = self.path.read_bytes()
            except FileNotFoundError:  # released in between: try to create it again
                continue
            holder = self._parse(seen)
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
            if self._before_takeover is not None:
                self._before_takeover()
            claim = self.path.with_name(f".{self.path.name}.takeover-{hashlib.sha256(seen).hexdigest()[:16]}")
            if self._take_over(seen, mine, claim):
                self.held = True
                if holder.get("pid") != me["pid"] or holder.get("host") != me["host"]:
                    self.taken_over = holder
                return self
            time.sleep(self._retry_s)  # another process is taking it over: see who won
        raise RunLockedError(
            f"could not take {self.path}: another process kept taking it over"
            + (f" ({claim} exists; delete it if no process is starting in {self.path.parent})"
               if claim is not None and claim.exists() else "")
            + f"; delete {self.path} if no run uses {self.path.parent}")

    def _take_over(self, seen: bytes, mine: str, claim: Path) -> bool:
        """Replace the lock whose content is ``seen`` with ``mine``, if no other process does it
        first (the class docstring says why this is atomic). False: someone else did (or is)."""
        if not create_exclusive(claim, mine):
            return False
        try:
            try:
                if self.path.read_bytes() != seen:  # replaced or released since we judged it
                    return False
            except FileNotFoundError:
                return False
            write_text(self.path, mine)
            return True
        finally:
            claim.unlink(missing_ok=True)

    def _holder(self) -> Optional[dict]:
        try:
            return self._parse(self.path.read_bytes())
        except OSError:
            return None

    @staticmethod
    def _parse(text: bytes) -> Optional[dict]:
        try:
            holder = json.loads(text)
        except ValueError:
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
        holder = self._holder() or {}
        if self.held and (holder.get("pid"), holder.get("host")) == (os.getpid(), this_host()):
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
