"""The LightningModule: one for every objective.

The objective (ettin.objectives) has chosen the attention direction (the model's ``causal``), the
collator (the labels) and the metrics; the step itself is ettin.step.TrainStep, a plain object.
Lightning runs the loop, the processes, precision and the callbacks (checkpoints, validation,
preemption: ettin.runtime); distribution is applied from outside (ettin.distributed sets
``parallel``).

Each training batch is one whole optimizer step for this rank (a list of micro-batches), so the
global batch can change during batch-size warmup without Lightning's fixed accumulation.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import lightning as L
import torch

from ettin.distributed import Parallel
from ettin.flops import training_flops
from ettin.model import ModernBert
from ettin.objectives import Objective
from ettin.optim import StableAdamW, param_groups
from ettin.step import StepResult, TrainStep


class EttinModule(L.LightningModule):
    def __init__(
        self,
        model: ModernBert,
        *,
        objective: Objective,
        lr: float,
        lr_multiplier: Callable[[int], float],
        phase_tokens: int,
        weight_decay: float,
        betas: tuple[float, float],
        eps: float,
        peak_lr: Optional[float] = None,
        loss_normalization: str = "tokens",
        peak_flops: Optional[float] = None,
        optimizer_state: Optional[dict] = None,
        log_every_steps: int = 10,
        loader_state: Any = None,
        on_train_start_fn: Optional[Callable[["EttinModule"], None]] = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.automatic_optimization = False
        self.objective = objective
        self.lr = lr
        self.lr_multiplier = lr_multiplier
        self.phase_tokens = phase_tokens
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.eps = eps
        # StableAdamW scales weight decay by lr_t / max_lr: max_lr is the recipe's peak LR in every
        # phase, so a phase that starts at half the peak decays like the continuous recipe.
        self.peak_lr = peak_lr if peak_lr is not None else lr
        self.loss_normalization = loss_normalization
        self.peak_flops = peak_flops
        self.log_every_steps = log_every_steps
        self._optimizer_state = optimizer_state
        self.parallel = Parallel(model)  # replaced by ettin.distributed.parallelize under DDP/FSDP
        self.train_step: Optional[TrainStep] = None
        self.loader_state: Any = loader_state  # the loader's counters after the last finished step
        self.on_train_start_fn = on_train_start_fn
        self._window_start, self._window_tokens, self._window_flops = 0.0, 0, 0.0
        self.progress_metrics: dict[str, float] = {}  # shown by ettin.runtime.TokenProgressBar

    # -- optimizer ----------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = param_groups(self.model, self.weight_decay)
        optimizer = StableAdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps,
                                weight_decay=self.weight_decay, max_lr=self.peak_lr)
        if self._optimizer_state is not None:
            self.parallel.load_optimizer_state(optimizer, self._optimizer_state)
            self._optimizer_state = None
            # The moments carry over; the hyperparameters are this phase's (a restored state would
            # otherwise bring back the previous phase's weight decay, betas and eps).
            for group, fresh in zip(optimizer.param_groups, groups):
                group.update(weight_decay=fresh["weight_decay"], betas=self.betas, eps=self.eps,
                             max_lr=self.peak_lr)
        return optimizer

    # -- training -----------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if self.on_train_start_fn is not None:
            self.on_train_start_fn(self)
        world = self.trainer.world_size
        self.train_step = TrainStep(
            self.parallel.network, self.optimizers(use_pl_optimizer=False), lr=self.lr,
            lr_multiplier=self.lr_multiplier, loss_normalization=self.loss_normalization,
            world_size=world, sum_over_ranks=self._sum_over_ranks,
            gradient_sync=self.parallel.gradient_sync, backward=self.manual_backward,
        )
        self._window_start, self._window_tokens, self._window_flops = time.perf_counter(), 0, 0.0

    def training_step(self, step_batch: dict, batch_idx: int) -> None:
        state_after = step_batch["state"]
        # On the run's step counter (not Lightning's, which restarts at 0 on resume).
        log_now = state_after.step % self.log_every_steps == 0
        result = self.train_step(step_batch["micro_batches"],
                           tokens_before=state_after.tokens - step_batch["step_tokens"],
                           targets=step_batch["targets"], rows=step_batch["rows"],
                           with_grad_norm=log_now)
        self.loader_state = state_after
        self._count_work(step_batch)
        if log_now:
            self.train_step.check_finite(f"step {state_after.step}")
            self._log_step(step_batch, result)
        if state_after.tokens >= self.phase_tokens:
            self.trainer.should_stop = True

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size == 1:
            return value
        # Not strategy.reduce: Lightning puts a barrier before its all-reduce, and an NCCL barrier
        # blocks the host until the device has caught up (a sync at every step).
        total = value.clone()
        torch.distributed.all_reduce(total)
        return total

    def _log_step(self, step_batch: dict, result: StepResult) -> None:
        totals = self._sum_over_ranks(torch.stack([result.loss_sum, result.correct]))
        # One read from the device for all of them.
        loss_sum, correct, targets, norm = torch.stack([
            totals[0], totals[1], result.global_targets.float(),
            result.grad_norm.float().to(totals.device)]).tolist()
        loss = loss_sum / max(targets, 1.0)
        metrics = self.objective.metrics("train", loss, correct, targets)
        metrics.update({
            "train/lr": result.lr,
            "train/grad_norm": norm,
            "train/tokens": float(step_batch["state"].tokens),
            "train/global_batch": float(step_batch["global_batch"]),
        })
        # Throughput over the steps since the last log line, on this device's real tokens.
        now = time.perf_counter()
        seconds = now - self._window_start
        metrics["perf/tokens_per_s_per_device"] = self._window_tokens / seconds
        metrics["perf/tflops_per_device"] = self._window_flops / seconds / 1e12
        if self.peak_flops:
            metrics["perf/mfu"] = self._window_flops / seconds / self.peak_flops
        self._window_start, self._window_tokens, self._window_flops = now, 0, 0.0
        self.log_metrics(metrics)
        # Host floats for the progress bar: values given to self.log would stay device tensors that
        # Lightning reads back (a host sync) at every later step.
        self.progress_metrics = {"loss": round(loss, 3), "tok/s": metrics["perf/tokens_per_s_per_device"]}

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """To every logger, at the run's step (continuous across resumes; loggers are rank-0 only)."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.loader_state.step)

    def _count_work(self, step_batch: dict) -> None:
        causal = self.model.config.causal
        for lengths, n_targets in zip(step_batch["row_lengths"], step_batch["targets"]):
            self._window_tokens += sum(lengths)
            self._window_flops += training_flops(self.model.config, lengths, n_targets, causal)

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, float]:
        """Mean loss and the objective's figure over ``batches``, summed over ranks."""
        was_training = self.model.training
        self.model.eval()
        totals = torch.zeros(3, device=self.device)  # loss sum, targets, correct
        batches = list(batches)
        if self.parallel.sharded:  # every forward is collective: ranks with fewer batches repeat one
            most = int(self.trainer.strategy.reduce(
                torch.full((), float(len(batches)), device=self.device), reduce_op="max"))
            if len(batches) < most:
                if not batches:
                    raise RuntimeError("fewer validation samples than devices: raise trainer.val_samples")
                extra = self.trainer.strategy.batch_to_device(batches[0])
                for _ in range(most - len(batches)):
                    with self.trainer.precision_plugin.forward_context():
                        self.model(**extra, loss_reduction="sum")
        for batch in batches:
            batch = self.trainer.strategy.batch_to_device(batch)
            with self.trainer.precision_plugin.forward_context():
                out = self.model(**batch, loss_reduction="sum")
            totals += torch.stack([out.loss.float(),
                                   torch.full((), float(out.targets.numel()), device=self.device),
                                   out.n_correct.float()])
        self.model.train(was_training)
        totals = self._sum_over_ranks(totals)
        loss_sum, targets, correct = (float(t) for t in totals)
        return self.objective.metrics("val", loss_sum / max(targets, 1.0), correct, targets)


def count_on_host(batch: dict) -> dict:
    """Targets, row lengths and rows of each micro-batch, counted on the host before the copy to the
    device, so no step waits on a device sync to know them."""
    batch["targets"] = [int((mb["labels"] != -100).sum()) for mb in batch["micro_batches"]]
    batch["row_lengths"] = [_row_lengths(mb) for mb in batch["micro_batches"]]
    batch["rows"] = [len(lengths) for lengths in batch["row_lengths"]]
    return batch


def _row_lengths(micro_batch: dict) -> list[int]:
    if "cu_seqlens" in micro_batch:
        return torch.diff(micro_batch["cu_seqlens"]).tolist()
    mask = micro_batch.get("attention_mask")
    if mask is None:
        return [micro_batch["input_ids"].shape[1]] * micro_batch["input_ids"].shape[0]
    return mask.sum(dim=1).tolist()
