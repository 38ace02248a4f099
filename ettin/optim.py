"""StableAdamW with fully decoupled weight decay, as Ettin trained (bert24 / optimi).

Per parameter tensor, at step t (one counter per parameter group), with debiased betas
b(beta, t) = beta (1 - beta^(t-1)) / (1 - beta^t):

    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2            (already bias-corrected)
    rms = sqrt(mean(g^2 / max(v, eps^2)))                                 (new v; per tensor)
    lr_t = lr / max(1, rms)                                               (AdaFactor-style clipping)
    p <- p (1 - weight_decay * lr_t / max_lr)                             (decoupled from lr)
    p <- p - lr_t m / (sqrt(v) + eps)

``max_lr`` is the peak LR the schedule scales from (default: the LR at construction); it is stored in
each parameter group, so the decay strength follows the schedule's shape, not the LR's magnitude.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class StableAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-6, weight_decay: float = 0.0, max_lr: float | None = None) -> None:
        if lr <= 0 or eps <= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid StableAdamW settings lr={lr} betas={betas} eps={eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        max_lr=max_lr if max_lr is not None else lr)
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
            group["step"] = group.get("step", 0) + 1
            t = group["step"]
            beta1, beta2 = group["betas"]
            b1 = beta1 * (1 - beta1 ** (t - 1)) / (1 - beta1**t)
            b2 = beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t)
            eps, lr, wd, max_lr = group["eps"], group["lr"], group["weight_decay"], group["max_lr"]
            for p in params:
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                # Tensor ops only (no .item()): no host sync per parameter.
                rms = (g.square() / v.clamp(min=eps * eps)).mean().sqrt()
                step_lr = lr / rms.clamp(min=1.0)
                if wd:
                    p.mul_(1 - step_lr * (wd / max_lr))
                p.sub_(step_lr * m / (v.sqrt() + eps))
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[no decay: norms and biases (ndim <= 1 or *.bias), decay: everything else]; tied weights once."""
    no_decay, decay = [], []
    for name, param in model.named_parameters():  # named_parameters() yields a tied weight once
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
