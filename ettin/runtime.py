"""What a training process does around the steps, as Lightning callbacks and a logger: checkpoints and
validation at token intervals, one continuous metrics.csv per phase, a progress bar in tokens, RNG
states."""

from __future__ import annotations

import csv
import dataclasses
import logging
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from ettin.checkpoint import Checkpointer
from ettin.recipes import TrainConfig, to_yaml

if TYPE_CHECKING:
    from ettin.module import EttinModule

log = logging.getLogger("ettin")


def capture_rng() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(states: list[dict], rank: int, world_size: int, seed: int) -> None:
    """Each rank's RNG as saved; on a different world size, a fresh seed per rank instead."""
    if len(states) == world_size:
        torch.set_rng_state(states[rank]["cpu"])
        if "cuda" in states[rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(states[rank]["cuda"])
    else:
        log.info("world size changed (%d -> %d): dropout RNG reseeded", len(states), world_size)
        torch.manual_seed(seed * 1000 + rank)


def _all_gather(obj):
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _crossed(before: int, after: int, every: int) -> bool:
    return bool(every) and after // every > before // every


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
        """Keep the rows logged up to the resume step (the rest is about to be redone)."""
        kept: list[dict] = []
        if self._resume_step and self.path.exists():
            with self.path.open(newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= self._resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_suffix(".tmp")
        with temp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        temp.replace(self.path)
        self._started = True


class TokenProgressBar(TQDMProgressBar):
    """The phase's progress in tokens, with its total, the loss and tok/s; no Lightning version number."""

    def __init__(self, phase: str, total_tokens: int, start_tokens: int) -> None:
        super().__init__()
        self.phase, self.total_tokens, self.start_tokens = phase, total_tokens, start_tokens

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.reset(total=self.total_tokens)
        self.train_progress_bar.n = self.start_tokens
        self.train_progress_bar.unit = " tok"
        self.train_progress_bar.unit_scale = True
        self.train_progress_bar.set_description(self.phase)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        bar.n = pl_module.loader_state.tokens
        bar.total = max(self.total_tokens, bar.n)  # the last step may overshoot the budget
        bar.set_postfix(self.get_metrics(trainer, pl_module))
        bar.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        """The module's last logged loss and tok/s (host floats; nothing is read from the device)."""
        return dict(getattr(pl_module, "progress_metrics", {}))


class EveryTokens(L.Callback):
    """Calls ``fire(module)`` after each step that crosses a multiple of ``every_tokens`` of the
    phase's token clock (0: never), except the phase's last step (the phase end does its own)."""

    def __init__(self, *, every_tokens: int, start_tokens: int) -> None:
        self.every_tokens = every_tokens
        self.last_tokens = start_tokens

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        tokens = module.loader_state.tokens
        if _crossed(self.last_tokens, tokens, self.every_tokens) and tokens < module.phase_tokens:
            self.fire(module)
        self.last_tokens = tokens

    def fire(self, module: "EttinModule") -> None:
        raise NotImplementedError


class ValidationCallback(EveryTokens):
    """Validation every ``every_tokens`` tokens of the phase (and, called by the phase's end, once
    more), logged to metrics.csv with the tokens it was measured at. The batches are made once: the
    same samples and masks at every evaluation."""

    def __init__(self, make_batches: Callable[["EttinModule"], Any], *, every_tokens: int,
                 start_tokens: int) -> None:
        super().__init__(every_tokens=every_tokens, start_tokens=start_tokens)
        self.make_batches = make_batches
        self.batches: Optional[list] = None

    def fire(self, module: "EttinModule") -> None:
        self.validate(module)

    def validate(self, module: "EttinModule") -> dict[str, float]:
        if self.batches is None:
            self.batches = self.make_batches(module)
        if not self.batches:  # e.g. a replayed released data order, which has no validation split
            return {}
        metrics = module.evaluate(self.batches)
        module.log_metrics({**metrics, "val/tokens": float(module.loader_state.tokens)})
        log.info("validation at %s tokens: %s", f"{module.loader_state.tokens:,}",
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics


class CheckpointCallback(EveryTokens):
    """Checkpoints every ``every_tokens`` tokens of the phase; ``save`` also serves the phase end and
    preemption. Nothing is written from a state whose loss was not finite."""

    def __init__(self, cfg: TrainConfig, phase: str, tokenizer, checkpointer: Checkpointer, *,
                 every_tokens: int, start_tokens: int, fresh_optimizer: bool,
                 data_identity: dict) -> None:
        super().__init__(every_tokens=every_tokens, start_tokens=start_tokens)
        self.cfg, self.phase, self.tokenizer = cfg, phase, tokenizer
        self.checkpointer = checkpointer
        self.fresh_optimizer = fresh_optimizer
        self.data_identity = data_identity

    def fire(self, module: "EttinModule") -> None:
        self.save(module, kind="interval")

    def save(self, module: "EttinModule", *, kind: str) -> Path:
        """Every rank calls this; rank 0 writes the checkpoint atomically."""
        module.train_step.check_finite(f"the {kind} checkpoint at step {module.loader_state.step}")
        rng = _all_gather(capture_rng())
        state = module.loader_state
        # Collective when the model is sharded: every rank takes part, rank 0 receives it whole.
        weights = module.parallel.full_model_state()
        optimizer_state = module.parallel.full_optimizer_state(module.optimizers(use_pl_optimizer=False))
        path = self.checkpointer.run_dir / "checkpoints" / self.checkpointer.name(
            self.phase, state.step, state.tokens)
        if module.global_rank == 0:
            path = self.checkpointer.save(
                phase=self.phase, phase_index=self.cfg.phase_order.index(self.phase), kind=kind,
                loader_state={"step": state.step, "samples": state.samples, "tokens": state.tokens},
                model_state=weights, optimizer_state=optimizer_state, rng_states=rng,
                config_yaml=to_yaml(self.cfg),
                meta={
                    "run_name": self.cfg.run_name, "recipe": self.cfg.recipe,
                    "objective": self.cfg.objective, "world_size": module.trainer.world_size,
                    "model_config": dataclasses.asdict(module.model.config),
                    "tokenizer": str(self.tokenizer_dir()), "git_commit": git_commit(),
                    "fresh_optimizer": self.fresh_optimizer, "data": self.data_identity,
                },
            )
            log.info("checkpoint %s", path)
        _barrier()
        return path

    def tokenizer_dir(self) -> Path:
        """The run keeps its own copy of the tokenizer, so checkpoints are self-contained."""
        directory = self.cfg.run_dir / "tokenizer"
        if not (directory / "tokenizer_config.json").exists():
            self.tokenizer.save_pretrained(directory)
        return directory.resolve()


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
