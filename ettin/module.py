"""The LightningModule: one for every objective.

The objective has already chosen the attention direction (the model's ``causal``) and the collator
(the labels); the loss is the same cross-entropy over labelled positions for all of them.

Each training batch is one whole optimizer step for this rank (a list of micro-batches), so the
global batch can change during batch-size warmup without Lightning's fixed accumulation. The loss is
normalised by the number of target tokens of the whole step, summed over micro-batches and ranks:
every target token weighs the same whatever micro-batch or rank it fell into (Composer instead
averages per micro-batch, which depends on how sequences fall into micro-batches).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch.nn.parallel import DistributedDataParallel

from ettin.flops import training_flops
from ettin.model import ModernBert
from ettin.optim import StableAdamW, grad_norm, param_groups


class EttinModule(L.LightningModule):
    def __init__(
        self,
        model: ModernBert,
        *,
        objective: str,
        lr: float,
        lr_multiplier: Callable[[int], float],
        phase_tokens: int,
        weight_decay: float,
        betas: tuple[float, float],
        eps: float,
        peak_flops: Optional[float] = None,
        optimizer_state: Optional[dict] = None,
        log_every_steps: int = 10,
    ) -> None:
        super().__init__()
        self.model = model
        self.automatic_optimization = False
        self.objective = objective
        self.lr = lr
        self.lr_multiplier = lr_multiplier
        self.phase_tokens = phase_tokens
        self.weight_decay = weight_decay
        self.betas = betas
        self.eps = eps
        self.peak_flops = peak_flops
        self.log_every_steps = log_every_steps
        self._optimizer_state = optimizer_state
        self._ddp: list[DistributedDataParallel] = []  # a list so it is not registered as a submodule
        self._sharded = False  # trainer.strategy=fsdp: parameters sharded in place by fully_shard
        self._window_start, self._window_tokens, self._window_flops = 0.0, 0, 0.0
        self.loader_state: Any = None  # the data loader's counters after the last finished step
        self.step_hooks: list[Callable[["EttinModule"], None]] = []  # run after every optimizer step

    # -- wiring -------------------------------------------------------------------------------------
    def wrap_ddp(self, **ddp_kwargs: Any) -> None:
        """Called by StepSyncDDPStrategy: DDP around the network only, so micro-batches can skip sync."""
        self._ddp = [DistributedDataParallel(self.model, **ddp_kwargs)]

    def shard(self) -> None:
        """Called by StepSyncDDPStrategy for trainer.strategy=fsdp: FSDP2 shards each layer and the
        rest (embeddings, tied vocabulary projection, head) across the ranks."""
        from torch.distributed.fsdp import fully_shard

        for layer in self.model.model.layers:
            fully_shard(layer)
        fully_shard(self.model)
        self._sharded = True

    def full_model_state(self) -> dict:
        """The whole model state dict on CPU (every rank must call it; sharded: rank 0 gets it)."""
        if not self._sharded:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state dict in torch's usual layout (parameters numbered in group order),
        whole, whatever the strategy: it loads on any world size (every rank must call it)."""
        if not self._sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        by_name = get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if not by_name:  # ranks other than 0
            return {}
        return _rekey(by_name, {n: i for i, n in enumerate(self._parameter_names(optimizer))})

    def _load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if not self._sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        by_name = _rekey(state, dict(enumerate(self._parameter_names(optimizer))))
        set_optimizer_state_dict(self.model, optimizer, by_name,
                                 options=StateDictOptions(full_state_dict=True))

    def _parameter_names(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """The names of the optimizer's parameters in torch's numbering (group by group)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]

    def _gradient_sync(self, enabled: bool):
        """The context of one micro-batch's backward: gradients are reduced across ranks only when
        ``enabled`` (the step's last micro-batch), once per optimizer step."""
        if self._sharded:
            self.model.set_requires_gradient_sync(enabled)
        elif self._ddp and not enabled:
            return self._ddp[0].no_sync()
        return nullcontext()

    @property
    def network(self) -> torch.nn.Module:
        return self._ddp[0] if self._ddp else self.model

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = StableAdamW(
            param_groups(self.model, self.weight_decay),
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
        )
        if self._optimizer_state is not None:
            self._load_optimizer_state(optimizer, self._optimizer_state)
            self._optimizer_state = None
        return optimizer

    # -- training -----------------------------------------------------------------------------------
    def training_step(self, step_batch: dict, batch_idx: int) -> None:
        optimizer = self.optimizers()
        micro_batches: list[dict] = step_batch["micro_batches"]
        state_after = step_batch["state"]
        tokens_before = state_after.tokens - step_batch["step_tokens"]

        local_targets = sum(step_batch["targets"])
        global_targets = self._sum_over_ranks(torch.tensor(float(local_targets), device=self.device))
        # DDP averages gradients over ranks; scale so the result is the global per-token mean.
        scale = self.trainer.world_size / global_targets.clamp(min=1.0)

        lr = self.lr * self.lr_multiplier(tokens_before)
        for group in optimizer.param_groups:
            group["lr"] = lr

        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        last = len(micro_batches) - 1
        for index, micro_batch in enumerate(micro_batches):
            with self._gradient_sync(index == last):
                out = self.network(**micro_batch, loss_reduction="sum")
                self.manual_backward(out.loss * scale)
            loss_sum += out.loss.detach()
            if self.objective != "clm":
                targets = micro_batch["labels"][micro_batch["labels"] != -100]
                correct += (out.logits.detach().argmax(-1) == targets).sum()

        # On the run's step counter (not Lightning's, which restarts at 0 on resume).
        log_now = state_after.step % self.log_every_steps == 0
        norm = grad_norm(self.model.parameters()) if log_now else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        self.loader_state = state_after
        self._count_work(step_batch)
        if log_now:
            self._log_step(step_batch, global_targets, loss_sum, correct, lr, norm)
        self.log("loss", loss_sum / max(local_targets, 1), prog_bar=True, on_step=True)
        for hook in self.step_hooks:
            hook(self)
        if state_after.tokens >= self.phase_tokens:
            self.trainer.should_stop = True

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value, reduce_op="sum")

    def _log_step(self, step_batch, global_targets, loss_sum, correct, lr, grad_norm) -> None:
        totals = self._sum_over_ranks(torch.stack([loss_sum, correct]))
        loss = totals[0] / global_targets.clamp(min=1.0)
        metrics = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens": float(step_batch["state"].tokens),
            "train/global_batch": float(step_batch["global_batch"]),
        }
        if self.objective == "clm":
            metrics["train/perplexity"] = torch.exp(loss.clamp(max=30.0))
        else:
            metrics["train/masked_accuracy"] = totals[1] / global_targets.clamp(min=1.0)
        # Throughput over the steps since the last log line, on this device's real tokens.
        now = time.perf_counter()
        seconds = now - self._window_start
        metrics["perf/tokens_per_s_per_device"] = self._window_tokens / seconds
        metrics["perf/tflops_per_device"] = self._window_flops / seconds / 1e12
        if self.peak_flops:
            metrics["perf/mfu"] = self._window_flops / seconds / self.peak_flops
        self._window_start, self._window_tokens, self._window_flops = now, 0, 0.0
        self.log_dict(metrics, on_step=True)
        self.log("tok/s", metrics["perf/tokens_per_s_per_device"], prog_bar=True)

    def on_train_start(self) -> None:
        self._window_start, self._window_tokens, self._window_flops = time.perf_counter(), 0, 0.0

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Counted on the host before the copy to the device, so no step waits on a device sync.
        batch["targets"] = [int((mb["labels"] != -100).sum()) for mb in batch["micro_batches"]]
        batch["row_lengths"] = [_row_lengths(mb) for mb in batch["micro_batches"]]
        return batch

    def _count_work(self, step_batch: dict) -> None:
        causal = self.model.config.causal
        for lengths, n_targets in zip(step_batch["row_lengths"], step_batch["targets"]):
            self._window_tokens += sum(lengths)
            self._window_flops += training_flops(self.model.config, lengths, n_targets, causal)

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, float]:
        """Mean loss (and masked accuracy) over ``batches``, summed over ranks."""
        was_training = self.model.training
        self.model.eval()
        totals = torch.zeros(3, device=self.device)  # loss sum, targets, correct
        batches = list(batches)
        if self._sharded:  # every forward is collective: ranks with fewer batches repeat one, unweighted
            most = int(self.trainer.strategy.reduce(
                torch.tensor(float(len(batches)), device=self.device), reduce_op="max"))
            if len(batches) < most:
                if not batches:
                    raise RuntimeError("fewer validation samples than devices: raise trainer.val_batches")
                extra = self.trainer.strategy.batch_to_device(batches[0])
                for _ in range(most - len(batches)):
                    with self.trainer.precision_plugin.forward_context():
                        self.model(**extra, loss_reduction="sum")
        for batch in batches:
            batch = self.trainer.strategy.batch_to_device(batch)
            with self.trainer.precision_plugin.forward_context():
                out = self.model(**batch, loss_reduction="sum")
            labels = batch["labels"][batch["labels"] != -100]
            totals += torch.stack(
                [out.loss.float(), torch.tensor(float(labels.numel()), device=self.device),
                 (out.logits.argmax(-1) == labels).sum().float()]
            )
        self.model.train(was_training)
        totals = self._sum_over_ranks(totals)
        loss = (totals[0] / totals[1].clamp(min=1.0)).item()
        metrics = {"val/loss": loss}
        if self.objective == "clm":
            metrics["val/perplexity"] = math.exp(min(loss, 30.0))
        else:
            metrics["val/masked_accuracy"] = (totals[2] / totals[1].clamp(min=1.0)).item()
        return metrics


def _row_lengths(micro_batch: dict) -> list[int]:
    if "cu_seqlens" in micro_batch:
        return torch.diff(micro_batch["cu_seqlens"]).tolist()
    mask = micro_batch.get("attention_mask")
    if mask is None:
        return [micro_batch["input_ids"].shape[1]] * micro_batch["input_ids"].shape[0]
    return mask.sum(dim=1).tolist()


def _rekey(optimizer_state: dict, key: dict) -> dict:
    """An optimizer state dict with its parameter keys mapped through ``key`` (names <-> numbers)."""
    return {"state": {key[k]: v for k, v in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [key[k] for k in group["params"]]}
                             for group in optimizer_state["param_groups"]]}
