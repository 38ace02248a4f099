"""One optimizer step as a plain object: micro-batches -> loss normalisation -> LR from the token clock
-> gradient sync -> optimizer step. No Lightning in here, so it is tested directly (tests/test_step.py).

Loss normalisation (``optim.loss_normalization``):
- ``tokens`` (default; docs/recipes.md, loss normalisation): the mean over every target token of the step, across micro-batches
  and ranks (MDLM: its 1/t-weighted target losses over every token of its rows, the bound). Each micro-batch's summed loss is divided by the step's global target count, so a token
  weighs the same whichever micro-batch or rank it fell into.
- ``micro_batch``: Composer's way, how the released Ettin models were trained: each micro-batch's own
  mean loss, weighted by its share of the rank's sequences, averaged over ranks.
``tokens`` multiplies by the world size because DDP (and FSDP's reduce-scatter) average gradients over
ranks; ``micro_batch`` keeps that average, as Composer did. The loss reported is always the token mean,
so runs compare whatever they normalise by. Nothing in a step waits on the device (no host sync):
counts come from the host, the global target count stays a device tensor.

An objective mix (GPT-BERT) has one target group per objective: each group is normalised on its
own (its loss over its targets of the whole step, as above) and the groups' means are summed with
the mix's normalised weights (``StepSettings.group_weights``). One objective is one group of
weight 1, the case above.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch

from ettin.optim.stable_adamw import grad_norm


LOSS_NORMALIZATIONS = ("tokens", "micro_batch")


@dataclass(frozen=True)
class StepSettings:
    """A phase's optimizer step: its LR on the token clock, the optimizer's hyperparameters and how
    the loss is normalised. Built once per phase (ettin.train.phase) for the module and the step."""

    lr: float  # the phase's start LR (the recipe's peak LR x the phase's lr_scale)
    lr_multiplier: Callable[[int], float]  # of the phase's tokens before the step
    peak_lr: float  # the recipe's peak LR: StableAdamW scales weight decay by lr_t / peak_lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    loss_normalization: str = "tokens"
    group_weights: tuple[float, ...] = (1.0,)  # an objective mix's normalised weights, in its order

    def __post_init__(self) -> None:
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"loss_normalization={self.loss_normalization!r}: one of "
                             f"{', '.join(LOSS_NORMALIZATIONS)}")
        if len(self.group_weights) > 1 and self.loss_normalization != "tokens":
            raise ValueError("an objective mix normalises each objective over the step's targets: "
                             "use loss_normalization='tokens'")

    def lr_at(self, tokens_before: int) -> float:
        """The LR of the step that starts after ``tokens_before`` tokens of the phase."""
        return self.lr * self.lr_multiplier(tokens_before)


@dataclass
class StepResult:
    """Per target group ([groups] tensors on the device; one group without a mix)."""

    loss_sum: torch.Tensor  # summed cross-entropy of this rank's targets
    correct: torch.Tensor  # this rank's targets predicted right (argmax)
    global_targets: torch.Tensor  # summed over ranks
    lr: float
    grad_norm: torch.Tensor  # the global gradient norm, on the device (0-dim)


def on_device(values, device) -> torch.Tensor:
    """A 1-d float tensor of host numbers, filled on the device (no host-to-device copy)."""
    return torch.stack([torch.full((), float(v), device=device) for v in values])


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm is NaN or infinite: training stops rather than train on it."""


class TrainStep:
    """Runs one optimizer step on ``network`` (the model, possibly wrapped for DDP).

    ``sum_over_ranks`` adds a tensor over ranks (identity on one process); ``gradient_sync(enabled)``
    is the context of a micro-batch's backward; ``backward`` runs a backward pass (Lightning's
    precision-aware ``manual_backward`` in training); ``forward_context`` wraps forwards (autocast).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        settings: StepSettings,
        *,
        world_size: int = 1,
        sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
        gradient_sync: Callable[[bool], ContextManager] = lambda enabled: nullcontext(),
        backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
        forward_context: Callable[[], ContextManager] = nullcontext,
    ) -> None:
        self.network = network
        self.optimizer = optimizer
        self.settings = settings
        self.world_size = world_size
        self.sum_over_ranks = sum_over_ranks
        self.gradient_sync = gradient_sync
        self.backward = backward
        self.forward_context = forward_context
        # On the device: whether any step's loss or gradient was not finite; read (a host sync) only
        # by check_finite. None before the first step.
        self.nonfinite: Optional[torch.Tensor] = None

    def __call__(self, micro_batches: list[dict], *, tokens_before: int, targets: list[int],
                 rows: list[int], group_targets: Optional[list[list[int]]] = None) -> StepResult:
        """``targets``/``rows``: labelled positions and sequences of each micro-batch, counted on the
        host (so nothing here waits on the device to know them); ``group_targets``: what each
        micro-batch's loss is averaged over, per group (None: its targets, one group; MDLM: its
        tokens, ``loss_tokens``)."""
        device = next(iter(micro_batches[0].values())).device
        group_targets = [[n] for n in targets] if group_targets is None else group_targets
        weights = self.settings.group_weights
        local_targets = [float(sum(g)) for g in zip(*group_targets)]
        if len(local_targets) != len(weights):
            raise ValueError(f"micro-batches of {len(local_targets)} target groups for "
                             f"{len(weights)} group weights")
        # torch.full fills on the device; torch.tensor(x, device=...) would copy from host memory,
        # which waits for the device's queue to drain.
        global_targets = self.sum_over_ranks(on_device(local_targets, device))
        group_weights = on_device(weights, device)
        lr = self.settings.lr_at(tokens_before)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        loss_sum = torch.zeros(len(weights), device=device)
        correct = torch.zeros(len(weights), device=device)
        last = len(micro_batches) - 1
        for index, micro_batch in enumerate(micro_batches):
            with self.gradient_sync(index == last):
                with self.forward_context():
                    out = self.network(**micro_batch, loss_reduction="sum")
                scale = self._scale(sum(group_targets[index]), rows[index], global_targets, sum(rows))
                self.backward((out.group_loss * group_weights * scale).sum())
            loss_sum += out.group_loss.detach().float()
            correct += out.group_correct.float()  # counted on the device: no sync

        # Every step, not only logged ones: one inf/NaN gradient (the loss still finite) turns the
        # weights NaN in this very optimizer step, so a flag raised only on log steps would let the
        # next checkpoint be written from them. The norm is one pass over the gradients, on the
        # device; the flag is read (a host sync) only by check_finite.
        norm = grad_norm(p for g in self.optimizer.param_groups for p in g["params"]).to(device)
        bad = ~(torch.isfinite(loss_sum).all() & torch.isfinite(norm))
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_sum, correct, global_targets, lr, norm)

    def _scale(self, mb_targets: int, mb_rows: int, global_targets: torch.Tensor, local_rows: int):
        if self.settings.loss_normalization == "tokens":
            return self.world_size / global_targets.clamp(min=1.0)
        # Composer: mean over the micro-batch's targets, weighted by its share of the rank's rows;
        # gradient averaging over ranks then averages the ranks.
        return (mb_rows / max(local_rows, 1)) / max(mb_targets, 1)

    def check_finite(self, where: str, *, steps: str = "") -> None:
        """Raise :class:`NonFiniteLossError` if any step since the start was not finite (a host sync:
        called at log steps and before every checkpoint). ``steps``: the steps the flag covers (the
        ones since the last check that passed), for the message."""
        if self.nonfinite is None:  # no step yet, on every rank alike
            return
        flag = self.nonfinite.float()
        if self.world_size > 1:  # every rank stops at the same step
            flag = self.sum_over_ranks(flag)
        if float(flag) > 0:
            raise NonFiniteLossError(
                f"the loss or the gradient became NaN/inf{' in ' + steps if steps else ''}, found "
                f"before {where}; training stopped and no checkpoint was written from this state."
            )
