"""A real one-node Slurm cluster for tests/test_slurm.py, started and stopped with .ci/slurm-setup.sh.

Skips (with the reason) only when Slurm is not installed or the tests do not run as root, and never
in CI (``CI=true``), where a missing cluster is a failure.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / ".ci" / "slurm-setup.sh"
SLURM_DIR = Path(os.environ.get("ETTIN_SLURM_DIR", "/tmp/ettin-slurm"))
CONF = SLURM_DIR / "etc" / "slurm.conf"
BINARIES = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun", "slurmctld", "slurmd", "munged")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED")
# States of a job that still holds the node or may start again (a job Slurm no longer knows has none).
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable_reason() -> Optional[str]:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"Slurm is not installed (missing {', '.join(missing)}); install it with "
                "`bash .ci/slurm-setup.sh install` (as root, Debian/Ubuntu)")
    if os.geteuid() != 0:
        return "the local Slurm cluster runs munged, slurmctld and slurmd as root; run as root"
    return None


def _setup(command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ETTIN_SLURM_DIR=str(SLURM_DIR))
    return subprocess.run(["bash", str(SETUP), command], capture_output=True, text=True, env=env,
                          timeout=120)


class LocalCluster:
    """The daemons of .ci/slurm-setup.sh; remembers the jobs it submits and cancels leftovers."""

    def __init__(self, directory: Path = SLURM_DIR) -> None:
        self.jobs: list[str] = []
        self.directory = directory
        self._lock = None

    def hold(self) -> None:
        """Take the cluster for this process. A second test process would restart the daemons under
        the first's jobs (they vanish from the controller), so it is refused with the holder named."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = open(self.directory / "tests.lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise RuntimeError(
                f"the local Slurm cluster is in use by {holder}: the Slurm test files must run in one "
                "process (one xdist worker: tests/conftest.py groups them), one test session at a time")
        lock.truncate(0)
        lock.write(f"pytest process {os.getpid()} ({os.environ.get('PYTEST_XDIST_WORKER', 'no xdist')})")
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def start(self) -> None:
        """A fresh cluster: daemons left by an earlier run are restarted and their saved jobs cleared."""
        self.hold()
        os.environ["SLURM_CONF"] = str(CONF)
        result = _setup("start")
        if result.returncode != 0:
            self.release()
            raise RuntimeError(f"could not start the local Slurm cluster:\n{result.stdout}{result.stderr}")

    def stop(self) -> None:
        active = [j for j in self.jobs if self.state(j).get("JobState") in ACTIVE]
        if active:
            subprocess.run(["scancel", *active], capture_output=True)
            try:
                self.wait_for(lambda: not any(self.state(j).get("JobState") in ACTIVE for j in active),
                              60, "cancelled jobs to end")
            except TimeoutError:
                pass
        _setup("stop")
        self.release()

    # -- jobs ---------------------------------------------------------------------------------------
    def track(self, job_id: str) -> str:
        self.jobs.append(job_id)
        return job_id

    def state(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, RunTime, ...)."""
        result = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                                text=True)
        fields = {}
        for token in result.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, timeout: float, states: Iterable[str] = FINISHED) -> dict[str, str]:
        states = tuple(states)
        found: dict[str, str] = {}

        def done() -> bool:
            nonlocal found
            found = self.state(job_id)
            return found.get("JobState") in states

        self.wait_for(done, timeout, f"job {job_id} to reach {'/'.join(states)}",
                      detail=lambda: str(found))
        return found

    def signal_batch(self, job_id: str, signal: str = "USR1") -> None:
        """What SLURM does ``--signal=B:USR1@lead`` seconds before the time limit."""
        subprocess.run(["scancel", "--batch", f"--signal={signal}", str(job_id)], check=True)

    @staticmethod
    def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.25,
                 detail: Optional[Callable[[], str]] = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(interval)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}" + (f": {detail()}" if detail else ""))


def local_cluster():
    """The ``cluster`` fixture (tests/conftest.py): one cluster per test session, started on first use."""
    reason = unavailable_reason()
    if reason:
        if in_ci():
            pytest.fail(f"CI must run the Slurm tests, but {reason}")
        pytest.skip(reason)
    local = LocalCluster()
    local.start()
    try:
        yield local
    finally:
        local.stop()
