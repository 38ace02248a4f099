"""Where training's figures go: ``metrics.csv`` per phase (always) and wandb (``logging.wandb``), both
at the run's own step, so a resumed or requeued run continues one series."""

from __future__ import annotations

import csv
import io
import os
import sys
import logging
import time
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from ettin.store.fs import write_text


class MetricsCSV(Logger):
    """``logs/<phase>/metrics.csv``: one row per logged step (train) and one per validation, at the
    run's step, with a fixed set of columns. A resumed phase keeps the rows up to the checkpoint's
    step and appends after them, so a phase has one continuous file whatever happened."""

    def __init__(self, path: Path, columns: list[str], *, resume_step: int = 0) -> None:
        super().__init__()
        self.path = Path(path)
        self.columns = ["step", *columns]
        self._resume_step = resume_step
        self._started = False

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return self.path.parent.name

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        if not self._started:
            self._start()
        unknown = set(metrics) - set(self.columns)
        if unknown:
            raise KeyError(f"metrics.csv has no column for {sorted(unknown)}")
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({"step": step, **metrics})

    def _start(self) -> None:
        """Keep the rows logged up to the resume step (the rest is about to be redone). A file that
        is not one of these (no header, other columns, binary or unreadable content) is moved aside
        whole with a warning naming both files, never read in part."""
        kept: list[dict] = []
        if self._resume_step and self.path.exists():
            rows = self._read()
            if rows is not None:
                kept = [r for r in rows if int(r["step"]) <= self._resume_step]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        write_text(self.path, text.getvalue())
        self._started = True


    def _read(self) -> Optional[list[dict]]:
        """The rows of the existing file, or None when it was moved aside as damaged."""
        try:
            with self.path.open(newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None:  # empty: nothing to keep, nothing to lose
                    return []
                rows = [dict(zip(header, row)) for row in reader]
            if header != self.columns:
                raise ValueError(f"its first line is not the header ({','.join(self.columns[:3])},...)")
            for number, row in enumerate(rows, start=2):
                if "\0" in "".join(row.values()) or not row["step"].isdigit():
                    raise ValueError(f"line {number} is not a row of metrics")
        except (UnicodeDecodeError, ValueError, csv.Error) as error:
            aside = self.path.with_name(f"{self.path.stem}.damaged-{time.strftime('%Y%m%d-%H%M%S')}.csv")
            os.replace(self.path, aside)
            logging.getLogger("ettin").warning(
                "%s is not a metrics file this run can continue (%s: %s); moved aside to %s with all "
                "its rows, and %s starts afresh", self.path, type(error).__name__, error, aside,
                self.path.name)
            return None
        return rows


def build_loggers(plan, resume_step: int) -> list:
    """metrics.csv (``logging.csv``) and wandb (``logging.wandb``) for one phase of a run (its
    ``PhasePlan``)."""
    from lightning.pytorch.loggers import WandbLogger

    from ettin.store.rundir import RunDir

    loggers: list = []
    settings, objective = plan.logging, plan.mix
    if settings.csv:
        columns = [*objective.train_metric_names(), "train/lr", "train/grad_norm", "train/tokens",
                   "train/global_batch", "perf/tokens_per_s_per_device", "perf/tflops_per_device",
                   "perf/mfu", *objective.metric_names("val"), "val/tokens"]
        loggers.append(MetricsCSV(RunDir(plan.run_dir).metrics(plan.phase), columns, resume_step=resume_step))
    if settings.wandb:
        mode = settings.wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        # One wandb run per ettin run: the id is the run name, so a requeued job continues it.
        loggers.append(WandbLogger(project=settings.wandb_project, name=plan.run_name,
                                   id=plan.run_name, resume="allow", save_dir=str(plan.run_dir),
                                   offline=mode == "offline"))
    return loggers


def finish_wandb() -> None:
    """End this process's wandb run, if one is open: wandb keeps one run per process, so the next
    run trained in this process (a pair's second run, a test's next call) would otherwise log into
    it. The phases of one ettin run share its wandb run (the id is the run name)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
