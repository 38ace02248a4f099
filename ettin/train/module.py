"""The LightningModule: one for every objective.

The objective mix (ettin.objectives.ObjectiveMix: one objective, or several with weights) has chosen
the attention direction (the model's ``causal``, or each row's in a mix), the collator (the labels),
the weights of the loss and the metrics; the step itself is ettin.train.step.TrainStep, a plain object.
Lightning runs the loop, the processes, precision and the callbacks (checkpoints, validation:
ettin.train.callbacks; preemption: ettin.train.preemption); distribution is applied from outside
(ettin.parallel.distributed sets ``parallel``).

Each training batch is one whole optimizer step for this rank (a list of micro-batches), so the
global batch can change during batch-size warmup without Lightning's fixed accumulation.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import lightning as L
import torch

from ettin.parallel.distributed import Parallel
from ettin.model.flops import training_flops
from ettin.model.modernbert import ModernBert
from ettin.objectives import ObjectiveMix
from ettin.optim.stable_adamw import StableAdamW, param_groups
from ettin.data.loader import LoaderState, StepBatch
from ettin.train.step import StepResult, StepSettings, TrainStep


class EttinModule(L.LightningModule):
    """``settings``: the phase's step (LR on the token clock, optimizer hyperparameters, loss
    normalisation); ``phase_tokens``: where the phase ends; ``loader_state``: the loader's counters
    after the last finished step; ``on_train_start_fn``: restores or seeds the RNGs once the
    processes exist."""

    def __init__(
        self,
        model: ModernBert,
        *,
        objective: ObjectiveMix,
        settings: StepSettings,
        phase_tokens: int,
        loader_state: LoaderState,
        optimizer_state: Optional[dict] = None,
        peak_flops: Optional[float] = None,
        log_every_steps: int = 10,
        on_train_start_fn: Optional[Callable[["EttinModule"], None]] = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.automatic_optimization = False
        self.objective = objective
        self.settings = settings
        self.phase_tokens = phase_tokens
        self.peak_flops = peak_flops
        self.log_every_steps = log_every_steps
        self._optimizer_state = optimizer_state
        self.parallel = Parallel(model)  # replaced by ettin.parallel.distributed.parallelize under DDP/FSDP
        self.train_step: Optional[TrainStep] = None
        self.loader_state = loader_state
        self.on_train_start_fn = on_train_start_fn
        self._window_start, self._window_tokens, self._window_flops = 0.0, 0, 0.0
        self.progress_metrics: dict[str, float] = {}  # shown by ettin.train.callbacks.TokenProgressBar
        self._finite_through = loader_state.step  # the last step check_finite found finite

    # -- optimizer ----------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        s = self.settings
        groups = param_groups(self.model, s.weight_decay)
        optimizer = StableAdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps,
                                weight_decay=s.weight_decay, max_lr=s.peak_lr)
        if self._optimizer_state is not None:
            self.parallel.load_optimizer_state(optimizer, self._optimizer_state)
            self._optimizer_state = None
            # The moments carry over; the hyperparameters are this phase's (a restored state would
            # otherwise bring back the previous phase's weight decay, betas and eps).
            for group, fresh in zip(optimizer.param_groups, groups):
                group.update(weight_decay=fresh["weight_decay"], betas=s.betas, eps=s.eps,
                             max_lr=s.peak_lr)
        return optimizer

    # -- training -----------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if self.on_train_start_fn is not None:
            self.on_train_start_fn(self)
        self.loader_state = self.loader_state.on_rank(self.global_rank)
        world = self.trainer.world_size
        self.train_step = TrainStep(
            self.parallel.network, self.optimizers(use_pl_optimizer=False), self.settings,
            world_size=world, sum_over_ranks=self._sum_over_ranks,
            gradient_sync=self.parallel.gradient_sync, backward=self.manual_backward,
        )
        self._window_start, self._window_tokens, self._window_flops = time.perf_counter(), 0, 0.0
        self._finite_through = self.loader_state.step  # the last step known finite

    def training_step(self, batch: StepBatch, batch_idx: int) -> None:
        # On the run's step counter (not Lightning's, which restarts at 0 on resume).
        log_now = batch.state.step % self.log_every_steps == 0
        result = self.train_step(batch.micro_batches, tokens_before=batch.tokens_before,
                                 targets=batch.targets, rows=batch.rows,
                                 group_targets=batch.group_targets)
        self.loader_state = self.loader_state.after(batch)
        self._count_work(batch)
        if log_now:
            self.check_finite(f"step {batch.state.step}")
            self._log_step(batch, result)
        if batch.state.tokens >= self.phase_tokens:
            self.trainer.should_stop = True

    def check_finite(self, where: str) -> None:
        """Raise NonFiniteLossError if any step so far had a non-finite loss or gradient norm; the
        message names the steps since the last check that passed (one of them went wrong)."""
        if self.train_step is None:
            return
        first, last = self._finite_through + 1, self.loader_state.step
        self.train_step.check_finite(where, steps=f"step {last}" if first >= last
                                     else f"steps {first} to {last}")
        self._finite_through = last

    def full_state(self) -> tuple[dict, dict]:
        """Whole weights and optimizer state, for a checkpoint (collective when the model is
        sharded: every rank calls it, rank 0 receives them whole)."""
        weights = self.parallel.full_model_state()
        return weights, self.parallel.full_optimizer_state(self.optimizers(use_pl_optimizer=False))

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size == 1:
            return value
        # Not strategy.reduce: Lightning puts a barrier before its all-reduce, and an NCCL barrier
        # blocks the host until the device has caught up (a sync at every step).
        total = value.clone()
        torch.distributed.all_reduce(total)
        return total

    def _log_step(self, batch: StepBatch, result: StepResult) -> None:
        # Tokens a mask could select: an encoder row holds exactly two that it never selects, its
        # [CLS] and its closing [SEP] (ettin.objectives.collate).
        maskable = sum(map(sum, batch.row_lengths)) - 2 * sum(batch.rows)
        device, groups = result.loss_sum.device, len(result.loss_sum)
        totals = self._sum_over_ranks(torch.cat([
            result.loss_sum, result.correct, torch.full((1,), float(maskable), device=device)]))
        # One read from the device for all of them (per target group: loss, correct, targets).
        values = torch.cat([totals, result.global_targets.float(),
                            result.grad_norm.float().to(device).reshape(1)]).tolist()
        loss_sums, correct = values[:groups], values[groups:2 * groups]
        maskable, targets, norm = values[2 * groups], values[2 * groups + 1:-1], values[-1]
        metrics = self.objective.metrics("train", loss_sums, correct, targets)
        loss = metrics["train/loss"]
        if "train/mask_rate" in self.objective.train_metric_names():
            # The step's realised masked fraction (a scheduled rate shows).
            metrics["train/mask_rate"] = targets[0] / max(maskable, 1.0)
        metrics.update({
            "train/lr": result.lr,
            "train/grad_norm": norm,
            "train/tokens": float(batch.state.tokens),
            "train/global_batch": float(batch.global_batch),
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

    def _count_work(self, batch: StepBatch) -> None:
        for lengths, n_targets, causal, prefix in zip(batch.row_lengths, batch.targets, batch.row_causal,
                                                      batch.row_prefix):
            self._window_tokens += sum(lengths)
            self._window_flops += training_flops(self.model.config, lengths, n_targets,
                                                 self.model.config.causal if causal is None else causal,
                                                 prefix)

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches_by_objective: list[list]) -> dict[str, float]:
        """Each objective of the mix over its validation batches (in the mix's order; the same rows
        collated by each objective's collator), summed over ranks: the mix's metrics."""
        totals = torch.stack([self._evaluate(batches, member.causal) for member, batches
                              in zip(self.objective.members, batches_by_objective, strict=True)])
        loss_sums, targets, correct = self._sum_over_ranks(totals).t().tolist()
        return self.objective.metrics("val", loss_sums, correct, targets)

    def _evaluate(self, batches, causal: bool) -> torch.Tensor:
        """(loss sum, targets, correct) of this rank's ``batches`` in the objective's direction
        ``causal``, on the device."""
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
                        self.model(**extra, causal=causal, loss_reduction="sum")
        for batch in batches:
            batch = self.trainer.strategy.batch_to_device(batch)
            with self.trainer.precision_plugin.forward_context():
                out = self.model(**batch, causal=causal, loss_reduction="sum")
            totals += torch.stack([out.loss.float(),
                                   torch.full((), float(sum(out.loss_tokens)), device=self.device),
                                   out.n_correct.float()])
        self.model.train(was_training)
        return totals
