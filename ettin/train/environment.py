"""The process a run trains in: which rank it is, which devices it has, its threads, its log, and what
it records of its environment (versions, git commit)."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("ettin")


def is_rank_zero() -> bool:
    """Whether this process is the job's first (SLURM's or torchrun's RANK, or the process Lightning
    started the others from: they get LOCAL_RANK / NODE_RANK)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def trainer_devices(accelerator: str, devices: Any) -> tuple[str, int]:
    """``trainer.accelerator`` and ``trainer.devices`` with ``auto`` resolved."""
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if devices in ("auto", -1):
        devices = torch.cuda.device_count() if accelerator == "gpu" else 1
    return accelerator, int(devices)


def set_cpu_threads(accelerator: str, devices: int, threads: Optional[int] = None) -> None:
    """On CPU, each process of a run gets ``threads`` threads, by default its share of the cores
    (torch's default takes them all in every process, and oversubscribed OpenMP threads slow
    everything on the machine 10x or more)."""
    if accelerator == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(threads or max(1, cores // max(devices, 1)))


def setup_logging(log_file: Path) -> None:
    """The ``ettin`` logger: stdout and the run's train.log, on rank 0 only."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
    if is_rank_zero():
        formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(log_file)):
            handler.setFormatter(formatter)
            log.addHandler(handler)
    log.propagate = False


def quiet_lightning_banners() -> None:
    """Lightning's info lines (device banners for every Trainer, a litlogger advertisement, "`Trainer.fit`
    stopped: `max_epochs=1` reached" after every phase) say nothing a run's own log does not; its
    warnings still show."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)


def environment_summary() -> dict[str, Any]:
    import lightning
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "devices_visible": torch.cuda.device_count(),
        "host": platform.node(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
