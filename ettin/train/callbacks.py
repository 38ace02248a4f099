"""What a training process does around the steps, as Lightning callbacks: checkpoints and validation
at token intervals, a progress bar in tokens, RNG states.

Callbacks use the module only through its narrow interface: ``loader_state``, ``phase_tokens``,
``evaluate``, ``log_metrics``, ``check_finite``, ``full_state``, ``progress_metrics`` and ``model.config``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

from ettin.optim.schedule import format_tokens
from ettin.store.fs import publishing
from ettin.train.checkpoint import Checkpointer
from ettin.train.environment import git_commit

if TYPE_CHECKING:
    from ettin.train.module import EttinModule
    from ettin.train.plan import PhasePlan

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


class PlainProgress(ProgressBar):
    """The phase's progress as one plain line every ``every_s`` seconds (and at the phase's end), for
    a stdout that is not a terminal (a Slurm log, a redirect): a redrawn bar there writes a
    carriage-return frame per refresh, hundreds of kilobytes of them in a minute. A ProgressBar, so
    Lightning adds no bar of its own."""

    def __init__(self, phase: str, total_tokens: int, start_tokens: int, *, every_s: float) -> None:
        super().__init__()
        self.phase, self.total_tokens, self.start_tokens = phase, total_tokens, start_tokens
        self.every_s = every_s
        self._enabled = True
        self._started = self._printed = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = self._printed = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._enabled and now - self._printed >= self.every_s:
            self._printed = now
            self.print_line(pl_module, now)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._enabled:
            self.print_line(pl_module, time.perf_counter())

    def print_line(self, pl_module, now: float) -> None:
        tokens = pl_module.loader_state.tokens
        total = max(self.total_tokens, tokens)  # the last step may overshoot the budget
        rate = (tokens - self.start_tokens) / max(now - self._started, 1e-9)
        left = total - tokens
        eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 else "?"
        loss = getattr(pl_module, "progress_metrics", {}).get("loss")
        print(f"{self.phase}: {format_tokens(tokens)}/{format_tokens(total)} tokens "
              f"({100 * tokens / max(total, 1):.1f}%), loss "
              f"{'-' if loss is None else f'{loss:.3f}'}, {format_tokens(rate)} tok/s, ETA {eta}",
              flush=True)


# How often a stdout that is not a terminal gets a progress line.
PLAIN_PROGRESS_EVERY_S = 30.0


def progress_callback(phase: str, total_tokens: int, start_tokens: int) -> ProgressBar:
    """A redrawn bar on a terminal; one plain line every PLAIN_PROGRESS_EVERY_S seconds otherwise."""
    if sys.stdout.isatty():
        return TokenProgressBar(phase, total_tokens, start_tokens)
    return PlainProgress(phase, total_tokens, start_tokens, every_s=PLAIN_PROGRESS_EVERY_S)


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
    """Validation every ``val_every_tokens`` tokens of the phase (and, called by the phase's end, once
    more), logged to metrics.csv with the tokens it was measured at. The batches are made once, from
    the plan (``PhasePlan.validation_batches``): the same samples and masks at every evaluation."""

    def __init__(self, plan: "PhasePlan", tokenizer, *, start_tokens: int) -> None:
        super().__init__(every_tokens=plan.intervals.val_every_tokens, start_tokens=start_tokens)
        self.plan, self.tokenizer = plan, tokenizer
        self.batches: Optional[list] = None

    def fire(self, module: "EttinModule") -> None:
        self.validate(module)

    def validate(self, module: "EttinModule") -> dict[str, float]:
        if self.batches is None:
            self.batches = self.plan.validation_batches(self.tokenizer, rank=module.global_rank,
                                                        world_size=module.trainer.world_size)
        if not any(self.batches):  # e.g. a replayed released data order: no validation split
            return {}
        metrics = module.evaluate(self.batches)
        module.log_metrics({**metrics, "val/tokens": float(module.loader_state.tokens)})
        log.info("validation at %s tokens: %s", f"{module.loader_state.tokens:,}",
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics


class CheckpointCallback(EveryTokens):
    """Checkpoints every ``every_tokens`` tokens of the phase; ``save`` also serves the phase end and
    preemption. Nothing is written from a state whose loss was not finite."""

    def __init__(self, plan: "PhasePlan", tokenizer, checkpointer: Checkpointer, *, config_yaml: str,
                 start_tokens: int) -> None:
        super().__init__(every_tokens=plan.intervals.checkpoint_every_tokens, start_tokens=start_tokens)
        self.plan, self.tokenizer, self.config_yaml = plan, tokenizer, config_yaml
        self.checkpointer = checkpointer
        self.run_dir = checkpointer.run_dir

    def fire(self, module: "EttinModule") -> None:
        self.save(module, kind="interval")

    def save(self, module: "EttinModule", *, kind: str) -> Path:
        """Every rank calls this; rank 0 writes the checkpoint atomically."""
        module.check_finite(f"the {kind} checkpoint at step {module.loader_state.step}")
        state = module.loader_state.of_all_ranks(_all_gather(module.loader_state.data_digest))
        rng = _all_gather(capture_rng())
        weights, optimizer_state = module.full_state()  # collective when the model is sharded
        plan = self.plan
        path = self.run_dir.checkpoint(plan.phase, state.step, state.tokens)
        if module.global_rank == 0:
            path = self.checkpointer.save(
                phase=plan.phase, phase_index=plan.index, kind=kind,
                loader_state=dataclasses.asdict(state), model_state=weights,
                optimizer_state=optimizer_state, rng_states=rng, config_yaml=self.config_yaml,
                meta={
                    "run_name": plan.run_name, "recipe": plan.recipe,
                    # The objective the model is (its export), and what the phase trained.
                    "objective": plan.objective.name,
                    "objective_mix": plan.mix.name,
                    "export_as": plan.mix.side,  # the export class's side
                    "world_size": module.trainer.world_size,
                    "model_config": dataclasses.asdict(module.model.config),
                    "tokenizer": str(self.tokenizer_dir()), "git_commit": git_commit(),
                    "fresh_optimizer": plan.fresh_optimizer, "data": plan.data_identity,
                    "plan": plan.as_dict(),  # the phase as resolved (ettin.report.runs reads it)
                },
            )
            log.info("checkpoint %s", path)
        _barrier()
        return path

    def tokenizer_dir(self) -> Path:
        """The run keeps its own copy of the tokenizer, so checkpoints are self-contained."""
        directory = self.run_dir.tokenizer
        if not (directory / "tokenizer_config.json").exists():
            with publishing(directory) as temp:
                self.tokenizer.save_pretrained(temp)
        return directory.resolve()
