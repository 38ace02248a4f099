"""StableAdamW with fully decoupled weight decay, as Ettin trained (bert24 / optimi), and its groups.

Per parameter tensor, at step t (t = 1, 2, ...; one counter per parameter group), with the debiased
betas b(beta, t) = beta (1 - beta^(t-1)) / (1 - beta^t):

    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2            (already bias-corrected)
    rms = sqrt(mean(g^2 / max(v, eps^2)))                                 (the NEW v; per tensor)
    lr_t = lr / max(1, rms)                                               (AdaFactor-style clipping)
    p <- p (1 - weight_decay * lr_t / max_lr)                             (decay first, on the old p)
    p <- p - lr_t m / (sqrt(v) + eps)

``max_lr`` is the LR the schedule scales from (default: the LR at construction). It is stored in each
parameter group and so saved in the optimizer's state dict; loading a state dict restores the saved
value (as Composer/optimi do: after a phase transition the decay strength still refers to the phase-1
peak). The decay therefore follows the schedule's shape, not the LR's magnitude. No gradient clipping
is needed or applied: the RMS clip replaces it.

The step runs on lists of tensors with ``torch._foreach_*`` kernels and never reads a value back to the
host (no ``.item()``), so it does not synchronise with the GPU once per parameter.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

# Temporaries of the foreach path (two lists the size of the parameters) are bounded by processing a
# group in chunks of at most this many elements.
CHUNK_ELEMENTS = 1 << 26


def debias_beta(beta: float, step: int) -> float:
    """beta (1 - beta^(t-1)) / (1 - beta^t): an EMA with this coefficient is already bias-corrected."""
    return beta * (1.0 - beta ** (step - 1)) / (1.0 - beta**step)


class StableAdamW(torch.optim.Optimizer):
    """StableAdamW with fully decoupled weight decay (``decouple_lr=True`` in optimi's terms)."""

    def __init__(
        self,
        params: Iterable,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_lr: float | None = None,
    ) -> None:
        max_lr = lr if max_lr is None else max_lr
        if not lr > 0 or not max_lr > 0 or not eps > 0 or weight_decay < 0:
            raise ValueError(f"StableAdamW needs lr, max_lr, eps > 0 and weight_decay >= 0; got "
                             f"lr={lr} max_lr={max_lr} eps={eps} weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"StableAdamW betas must lie in [0, 1); got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_lr=max_lr, step=0)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # .get/.setdefault: a state dict saved by another StableAdamW may lack these keys.
            group["step"] = group.get("step", 0) + 1
            max_lr = group.setdefault("max_lr", self.defaults["max_lr"])
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for chunk in _chunks(params):
                _update(
                    [_local(p) for p in chunk],
                    [_local(p.grad) for p in chunk],
                    [_local(self.state[p]["exp_avg"]) for p in chunk],
                    [_local(self.state[p]["exp_avg_sq"]) for p in chunk],
                    numels=[p.numel() for p in chunk], shard_group=_shard_group(chunk),
                    step=group["step"], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                    weight_decay=group["weight_decay"], max_lr=max_lr,
                )
        return loss


def _chunks(params: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    """Consecutive runs of same-device, same-dtype parameters of at most ~CHUNK_ELEMENTS elements."""
    chunk: list[torch.Tensor] = []
    size = 0
    for p in params:
        if chunk and (size + p.numel() > CHUNK_ELEMENTS or p.device != chunk[0].device
                      or p.dtype != chunk[0].dtype):
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += p.numel()
    if chunk:
        yield chunk


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 DTensor) tensor's local shard, updated in place; other tensors as they are."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _shard_group(tensors: list[torch.Tensor]):
    """The process group over which ``tensors`` are sharded (FSDP2), or None."""
    if isinstance(tensors[0], DTensor):
        if any(not isinstance(t, DTensor) for t in tensors):
            raise RuntimeError("sharded and unsharded tensors mixed in one update")
        return tensors[0].device_mesh.get_group()
    return None


def _whole_norms(norms: torch.Tensor, shard_group) -> torch.Tensor:
    """The 2-norms of whole tensors from the 2-norms of this rank's shards (or, unsharded, as given)."""
    if shard_group is None:
        return norms
    squares = norms.square()
    dist.all_reduce(squares, group=shard_group)
    return squares.sqrt()


def _update(params, grads, exp_avgs, exp_avg_sqs, *, numels, shard_group, step, lr, betas, eps,
            weight_decay, max_lr) -> None:
    """The update on local tensors. ``numels``: each tensor's whole size; ``shard_group``: when the
    tensors are shards, the group whose shards make up the whole (the RMS is over the whole tensor)."""
    b1, b2 = debias_beta(betas[0], step), debias_beta(betas[1], step)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - b1)  # m <- b1 m + (1 - b1) g
    torch._foreach_mul_(exp_avg_sqs, b2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - b2)  # v <- b2 v + (1 - b2) g^2

    sqrt_v = torch._foreach_sqrt(exp_avg_sqs)
    # rms = sqrt(mean(g^2 / max(v, eps^2))) = || g / (max(sqrt v, eps) sqrt(numel)) ||
    scaled = torch._foreach_maximum(sqrt_v, eps)
    torch._foreach_reciprocal_(scaled)
    torch._foreach_mul_(scaled, [1.0 / math.sqrt(n) for n in numels])  # host floats: no copy
    torch._foreach_mul_(scaled, grads)
    rms = _whole_norms(torch.stack(torch._foreach_norm(scaled)), shard_group)
    del scaled
    step_lrs = lr / rms.clamp(min=1.0)  # lr / max(1, rms): one value per tensor, kept on the device

    if weight_decay != 0:
        torch._foreach_mul_(params, list((1.0 - step_lrs * (weight_decay / max_lr)).unbind()))
    torch._foreach_add_(sqrt_v, eps)
    torch._foreach_reciprocal_(sqrt_v)
    torch._foreach_mul_(sqrt_v, exp_avgs)  # m / (sqrt(v) + eps)
    torch._foreach_mul_(sqrt_v, list((-step_lrs).unbind()))
    torch._foreach_add_(params, sqrt_v)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """``[no_decay, decay]``: no decay on ``ndim <= 1`` parameters (norms) and on names ending in
    ``.bias``; decay on everything else. A tied weight (embeddings = vocabulary projection) is counted
    once, as ``named_parameters()`` yields a shared parameter only once. Frozen parameters are left out."""
    no_decay, decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def param_group_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """The parameter names of ``param_groups``' two groups, for logs and tests."""
    no_decay, decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(name)
    return no_decay, decay


def grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The global gradient norm over ``parameters`` as a 0-dim tensor (no host synchronisation).

    For logging; it does not clip. Under DDP call it after the gradients are all-reduced; under FSDP
    (sharded gradients) every rank must call it."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    shard_group = _shard_group(grads)
    if shard_group is not None and norm_type != 2.0:
        raise ValueError("grad_norm of sharded gradients: only the 2-norm")
    norms = torch._foreach_norm([_local(g) for g in grads], norm_type)
    devices = {n.device for n in norms}
    if len(devices) > 1:
        norms = [n.to(grads[0].device) for n in norms]
    return torch.linalg.vector_norm(_whole_norms(torch.stack(norms), shard_group), norm_type)
