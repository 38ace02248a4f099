"""File helpers shared by the data modules."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (fcntl.flock) held while the block runs; concurrent preparations of
    one folder wait for each other instead of writing over each other."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def process_context(preload: list[str]):
    """The multiprocessing context for worker pools: fork is cheapest but unsafe in a process that
    runs other threads (a trainer, CUDA, a tokenizer's thread pool); then forkserver (one clean
    server process, forked per worker, with ``preload`` imported once); else spawn."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    if _single_threaded() and "fork" in methods:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(preload)
        return context
    return multiprocessing.get_context("spawn")


def _single_threaded() -> bool:
    """Whether this process runs a single OS thread (Linux: /proc/self/task)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False
