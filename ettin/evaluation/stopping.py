"""Ctrl-C and SIGTERM (what Slurm and ``timeout`` send) end ``python -m ettin.eval`` and
``python -m ettin.suite`` with one line and exit status 130 / 143, never a traceback.

SIGTERM is raised as :class:`Terminated`, a ``KeyboardInterrupt``, so everything that cleans up after
Ctrl-C (context managers, subprocess waits) does the same after SIGTERM; the command turns either
into :class:`Stopped`, which says what it was doing.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread. An interrupt's ``signum`` says which signal it stands for
    (a plain KeyboardInterrupt: SIGINT)."""

    signum = signal.SIGTERM


class Stopped(Exception):
    """A command stopped by Ctrl-C or SIGTERM while doing ``what``."""

    def __init__(self, what: str, interrupt: KeyboardInterrupt) -> None:
        super().__init__(what)
        self.what = what
        self.terminated = getattr(interrupt, "signum", signal.SIGINT) == signal.SIGTERM

    @property
    def exit_status(self) -> int:
        return 128 + (signal.SIGTERM if self.terminated else signal.SIGINT)

    @property
    def signal_name(self) -> str:
        return "SIGTERM" if self.terminated else "Ctrl-C (SIGINT)"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` where the main thread is."""

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
