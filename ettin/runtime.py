"""What a training process does around the steps: checkpoints, validation, RNG, speed switches."""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger
from torch.utils.checkpoint import checkpoint

from ettin.checkpoint import prune_checkpoints, save_weights, write_checkpoint
from ettin.preemption import PreemptionHandler
from ettin.recipes import TrainConfig, to_yaml

if TYPE_CHECKING:
    from ettin.module import EttinModule

log = logging.getLogger("ettin")


def apply_speedups(model: torch.nn.Module, *, compile: bool, activation_checkpointing: bool) -> None:
    """Per-layer activation checkpointing and compilation, applied from outside the model.

    Both keep the state-dict keys unchanged (no wrapper modules).
    """
    for layer in model.model.layers:
        if activation_checkpointing:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        if compile:
            layer.compile()


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


class ContinueLogs(L.Callback):
    """A resumed phase continues its logs instead of restarting them: Lightning counts logging steps
    from 0 again and its CSV logger empties ``metrics.csv``. Rows logged up to the checkpoint are
    kept (read here, before the logger starts), rows after it (about to be redone) are dropped, and
    steps continue from the checkpoint's, so wandb accepts them too."""

    def __init__(self, metrics_csv: Path, *, step: int, tokens: int) -> None:
        self.step = step
        self.rows: list[dict] = []
        if step and metrics_csv.exists():
            with metrics_csv.open(newline="") as f:
                rows = list(csv.DictReader(f))
            done = [i for i, row in enumerate(rows)
                    if row.get("train/tokens") and float(row["train/tokens"]) <= tokens]
            self.rows = rows[: done[-1] + 1] if done else []

    def on_train_start(self, trainer, module) -> None:
        trainer.fit_loop.epoch_loop._batches_that_stepped = self.step
        for logger in trainer.loggers if trainer.is_global_zero else []:  # rank 0 writes the logs
            if isinstance(logger, CSVLogger) and self.rows:
                logger.experiment.metrics[:0] = self.rows  # written out with the next rows


class CheckpointHook:
    """Checkpoints at token intervals and at the phase end; validation at token intervals."""

    def __init__(self, cfg: TrainConfig, phase: str, tokenizer, *, every_tokens: int,
                 start_tokens: int) -> None:
        self.cfg = cfg
        self.phase = phase
        self.tokenizer = tokenizer
        self.every_tokens = every_tokens
        self.last_tokens = start_tokens
        self.val_loader: Optional[Callable] = None

        self.preemption = PreemptionHandler(save_fn=lambda trainer: self.save(trainer.lightning_module))

    def callbacks(self) -> list:
        return [self.preemption]

    def after_step(self, module: "EttinModule") -> None:
        tokens = module.loader_state.tokens
        phase_done = tokens >= self.cfg.phases[self.phase].tokens
        if self.every_tokens and not phase_done and _crossed(self.last_tokens, tokens, self.every_tokens):
            self.save(module)
        self.last_tokens = tokens

    def validate_every(self, every_tokens: int) -> Callable[["EttinModule"], None]:
        previous = [self.last_tokens]

        def hook(module: "EttinModule") -> None:
            tokens = module.loader_state.tokens
            if _crossed(previous[0], tokens, every_tokens):
                self.validate(module)
            previous[0] = tokens

        return hook

    def validate(self, module: "EttinModule") -> dict[str, float]:
        metrics = module.evaluate(self.val_loader())
        for logger in module.loggers:
            logger.log_metrics(metrics, step=module.loader_state.step)
        log.info("validation at %s tokens: %s", f"{module.loader_state.tokens:,}",
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def save(self, module: "EttinModule", *, phase_end: bool = False) -> Path:
        """Every rank calls this; rank 0 writes the checkpoint atomically."""
        if phase_end and self.val_loader is not None:
            self.validate(module)
        rng = _all_gather(capture_rng())
        state = module.loader_state
        name = f"{self.phase}-step{state.step:07d}-tok{state.tokens:015d}"
        path = self.cfg.run_dir / "checkpoints" / name
        # Collective when the model is sharded: every rank takes part, rank 0 receives it whole.
        weights = module.full_model_state()
        optimizer_state = module.full_optimizer_state(module.optimizers(use_pl_optimizer=False))
        if module.global_rank == 0:
            meta = {
                "run_name": self.cfg.run_name,
                "recipe": self.cfg.recipe,
                "objective": self.cfg.objective,
                "phase": self.phase,
                "phase_index": self.cfg.phase_order.index(self.phase),
                "phase_end": phase_end,
                "step": state.step,
                "tokens": state.tokens,
                "loader_state": {"step": state.step, "samples": state.samples, "tokens": state.tokens},
                "world_size": module.trainer.world_size,
                "model_config": dataclasses.asdict(module.model.config),
                "tokenizer": str(self.tokenizer_dir()),
                "git_commit": git_commit(),
            }

            def write(directory: Path) -> None:
                save_weights(weights, directory)
                torch.save(optimizer_state, directory / "optimizer.pt")
                torch.save({"rng": rng}, directory / "rng.pt")
                (directory / "config.yaml").write_text(to_yaml(self.cfg))

            path = write_checkpoint(self.cfg.run_dir, name, write, meta)
            prune_checkpoints(self.cfg.run_dir, keep_last=self.cfg.keep_last_checkpoints,
                              keep=lambda m: bool(m.get("phase_end")))
            log.info("checkpoint %s", path)
        _barrier()
        return path

    def tokenizer_dir(self) -> Path:
        """The run keeps its own copy of the tokenizer, so checkpoints are self-contained."""
        directory = self.cfg.run_dir / "tokenizer"
        if not (directory / "tokenizer_config.json").exists():
            self.tokenizer.save_pretrained(directory)
        return directory.resolve()


def _crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
