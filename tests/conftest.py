"""Shared by the suite. It never touches the network: hub lookups fail at once instead of downloading."""

import logging
import os
from pathlib import Path

import pytest
from xdist.scheduler import LoadFileScheduling

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def cluster():
    """The real one-node Slurm cluster of .ci/slurm-setup.sh (tests/slurm_cluster.py), started fresh
    once per session: the Slurm files run on one xdist worker (see ``FileGroupScheduling`` below)."""
    from slurm_cluster import local_cluster

    yield from local_cluster()


class Crash(Exception):
    """The process dies between two steps (nothing after the last checkpoint is saved)."""


@pytest.fixture
def crash_at_tokens(monkeypatch):
    """``crash_at_tokens(cfg, tokens)``: train ``cfg`` until its loader has read ``tokens`` of the
    phase, then die between two steps, as a killed process would; training is restored after."""
    from ettin.train.module import EttinModule
    from ettin.train.run import train

    original = EttinModule.training_step

    def crash_at(cfg, tokens: int) -> None:
        def step_or_crash(self, batch, batch_idx):
            if self.loader_state is not None and self.loader_state.tokens >= tokens:
                raise Crash
            return original(self, batch, batch_idx)

        monkeypatch.setattr(EttinModule, "training_step", step_or_crash)
        try:
            with pytest.raises(Crash):
                train(cfg)
        finally:
            monkeypatch.setattr(EttinModule, "training_step", original)

    return crash_at


@pytest.fixture
def ettin_log(caplog):
    """What the "ettin" logger says during a test (it does not propagate once a run set it up)."""
    logger = logging.getLogger("ettin")
    logger.addHandler(caplog.handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(previous)


# pytest-xdist (pyproject's addopts: -n 2 --dist loadfile) hands each worker one group of tests at a
# time. A group is a file, so a file's module fixtures are built once; the files that submit to the
# local Slurm cluster are one group, so their jobs never wait behind each other's and one worker
# starts and stops the cluster. The longest groups start first, so the two workers end together.
# The groups are made by the scheduler below from the test ids alone. xdist's own `loadgroup` marks
# are not used: with pytest 9.2 they are silently ignored (xdist 3.8 writes the group into a node id
# attribute pytest no longer reads), which split every file across both workers.
SLURM_FILES = ("test_slurm.py", "test_slurm_arrays.py", "test_data_executor.py")
LONGEST_FIRST = ("test_smoke_learns.py", "slurm", "test_suite.py", "test_resume_world_size.py",
                 "test_train.py", "test_sweep.py", "test_notebooks.py", "test_eval_offline.py")


def file_group(nodeid: str) -> str:
    """The group of a test id: its file's name, or "slurm" for the files that use the cluster."""
    name = Path(nodeid.split("::", 1)[0]).name
    return "slurm" if name in SLURM_FILES else name


class FileGroupScheduling(LoadFileScheduling):
    """xdist's file-by-file scheduling with the Slurm files as one unit."""

    _split_scope = staticmethod(file_group)


def pytest_xdist_make_scheduler(config, log):
    return FileGroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    rank = {group: index for index, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(file_group(item.nodeid), len(rank)))  # stable otherwise
