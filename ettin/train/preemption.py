"""Preemption: a signal asks for a checkpoint at the next step boundary, then the job requeues itself.

The sequence (README.md, "Training on a cluster", tells it from the cluster's side):

1. SLURM sends SIGUSR1 ``--signal`` seconds before the time limit (or someone runs
   ``scancel --batch --signal=USR1 JOB``); the batch script forwards it to every task. The handler
   installed here only records it (nothing unsafe runs inside a signal handler), so the step in
   flight finishes normally.
2. At the end of every optimizer step (``on_train_batch_end``) the ranks all-reduce "has any rank
   been signalled?", so they all stop at the same step even if the signal reached them at
   different times.
3. Every rank calls ``save_fn(trainer)`` (the training's own checkpoint save, a collective).
4. Training stops (``trainer.should_stop``). When fit has returned, the ranks ignore SIGTERM (the
   requeue ends the job with one), meet at a barrier, and rank 0 runs ``scontrol requeue
   $SLURM_JOB_ID``; a second barrier keeps every rank alive until the requeue is issued. The
   processes then exit normally; the requeued job runs the same command and ``resume=auto``
   continues from that checkpoint in the same run dir.

SIGTERM and SIGINT are the other way a run ends early (``timeout``, ``scancel``, Slurm's time limit
without ``--signal``, Ctrl-C): :func:`stop_on_signals` turns them into :class:`Stopped` at once,
nothing more is saved (the run resumes from its latest checkpoint), and ``python -m ettin.train``
exits 143 or 130 with one line naming that checkpoint, so ``train && eval`` does not carry on with a
half-trained model. The requeue above ignores SIGTERM before it asks Slurm to end the job, so a
preempted run still exits 0.

Lightning's own SLURM requeue must be off (``SLURMEnvironment(auto_requeue=False)``), or two handlers
would answer the same signal. Signals are recorded process-wide: call :func:`install` at the very
start of the process, so a signal during start-up (data preparation, model build) is not fatal and
is honoured at the first step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal as _signal
import subprocess
import threading
import time
from datetime import timedelta
from typing import Callable, Iterator, Optional

import lightning as L

log = logging.getLogger("ettin")

# signum -> time.time() of the first delivery not yet acted on (process-wide, survives trainers).
_received: dict[int, float] = {}
_installed: set[int] = set()


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the process should exit cleanly."""


class Stopped(BaseException):
    """SIGTERM or SIGINT stopped the process (a BaseException, as KeyboardInterrupt is, so no
    ``except Exception`` on the way swallows it). The training fills in where it stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(_signal.Signals(signum).name)
        self.signum = signum
        self.tokens: Optional[int] = None  # of the phase, when training had started
        self.phase: Optional[str] = None
        self.run_name: Optional[str] = None
        self.checkpoint = None  # the run's latest checkpoint: where the same command resumes

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal killed

    def line(self) -> str:
        where = f"stopped at {self.tokens:,} tokens" if self.tokens is not None else "stopped"
        detail = ", ".join(x for x in (_signal.Signals(self.signum).name,
                                       self.run_name and f"run {self.run_name}",
                                       self.phase and f"phase {self.phase}") if x)
        then = (f"run the same command again to resume from {self.checkpoint}" if self.checkpoint
                else "run the same command again to start it again (no checkpoint was written yet)"
                if self.tokens is not None else "run the same command again to continue")
        return f"{where} ({detail}); {then}"


def _stop(signum: int, frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGINT raise :class:`Stopped` in the main thread (a signal during
    data preparation stops it too); the previous handlers come back after it. During
    ``trainer.fit`` Lightning calls its own SIGTERM notifier first, then this."""
    previous = {signum: _signal.signal(signum, _stop) for signum in (_signal.SIGTERM, _signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            _signal.signal(signum, handler)


def default_stop_signals() -> None:
    """In a data-loader worker: the default SIGTERM and SIGINT (the main process stops the run; a
    worker raising Stopped would print a traceback of its own)."""
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)


def _record(signum: int, frame) -> None:
    # Only record: logging, I/O or collectives here could deadlock with the interrupted code.
    _received.setdefault(signum, time.time())


def install(signum: int = _signal.SIGUSR1) -> bool:
    """Record ``signum`` instead of dying from it (the default action of SIGUSR1). Idempotent.

    Returns False when it cannot install (not the main thread). Processes forked afterwards (data
    loader workers) inherit the handler, so a signal sent to the whole process tree is harmless.
    """
    if signum in _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    _signal.signal(signum, _record)
    _installed.add(signum)
    return True


def received(signum: int = _signal.SIGUSR1) -> Optional[float]:
    """When ``signum`` arrived (epoch seconds), or None."""
    return _received.get(signum)


def clear(signum: int = _signal.SIGUSR1) -> None:
    _received.pop(signum, None)


def slurm_job_id() -> Optional[str]:
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_job(job_id: str) -> bool:
    """``scontrol requeue JOB``; True when SLURM accepted it."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("requeue of job %s failed: %s; submit the same command again to resume", job_id, error)
        return False
    if result.returncode != 0:
        log.warning("requeue of job %s failed (%d): %s; submit the same command again to resume",
                    job_id, result.returncode, (result.stdout + result.stderr).strip())
        return False
    log.info("requeued job %s: it resumes from this checkpoint when it starts again", job_id)
    return True


class PreemptionHandler(L.Callback):
    """On ``signal``: every rank stops at the same step boundary, ``save_fn(trainer)`` runs on every
    rank, and (``requeue=True``, inside a SLURM job) rank 0 requeues the job once fit has returned.

    ``preempted`` tells the caller afterwards that training stopped for this reason (raise
    :class:`Preempted`, exit 0). The ranks agree on the signal after every step (``check_every_n_steps``
    > 1: less often, reacting up to that many steps later) with an all-reduce of one integer over a
    CPU (gloo) process group, so the check never waits for a GPU; ``timeout`` is that group's
    collective timeout (a rank that stops answering fails the others after it).
    """

    def __init__(self, save_fn: Callable[[L.Trainer], object], signal: int = _signal.SIGUSR1,
                 requeue: bool = True, check_every_n_steps: int = 1,
                 timeout: Optional[timedelta] = None) -> None:
        self.save_fn = save_fn
        self.signal = signal
        self.requeue = requeue
        self.check_every_n_steps = max(1, int(check_every_n_steps))
        self.timeout = timeout
        self.preempted = False
        self.requeued = False
        self._pending_requeue = False
        self._flag_group = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        install(self.signal)
        import torch.distributed as dist

        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # Every rank runs setup, in the same order: the group is created collectively.
            self._flag_group = dist.new_group(backend="gloo", timeout=self.timeout)

    def _any_rank_signalled(self, trainer: L.Trainer) -> bool:
        signalled = received(self.signal) is not None
        if self._flag_group is not None:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([int(signalled)])
            dist.all_reduce(flag, group=self._flag_group)
            signalled = bool(flag.item())
        return signalled

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.preempted or trainer.global_step % self.check_every_n_steps:
            return
        if not self._any_rank_signalled(trainer):
            return
        since = received(self.signal)
        waited = f"{time.time() - since:.1f} s after the signal" if since else "signalled on another rank"
        if trainer.is_global_zero:
            log.info("preemption (%s): saving a checkpoint at step %d (%s)",
                     _signal.Signals(self.signal).name, trainer.global_step, waited)
        self.save_fn(trainer)
        clear(self.signal)
        self.preempted = True
        trainer.should_stop = True
        self._pending_requeue = self.requeue

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._flag_group is not None:
            import torch.distributed as dist

            dist.destroy_process_group(self._flag_group)
            self._flag_group = None
        # Runs after Lightning restored its own signal handlers, so nothing re-installs its SIGTERM
        # handler (which would run a collective inside the handler) behind our back.
        if not self._pending_requeue:
            return
        self._pending_requeue = False
        job = slurm_job_id()
        if job is None:
            if trainer.is_global_zero:
                log.info("preempted outside SLURM: run the same command again to resume")
            return
        # The requeue ends this job with SIGTERM to every process; the checkpoint is written, so let
        # the processes finish on their own (SLURM sends SIGKILL after KillWait if one does not).
        _signal.signal(_signal.SIGTERM, _signal.SIG_IGN)
        _barrier(trainer)
        if trainer.is_global_zero:
            self.requeued = requeue_job(job)
        _barrier(trainer)  # nobody exits (srun would kill the rest) before the requeue is issued


def _barrier(trainer: L.Trainer) -> None:
    import torch.distributed as dist

    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()
