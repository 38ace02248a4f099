"""Distribution applied from outside the model: ``parallelize`` wraps a plain model for DDP or shards it
with FSDP2; Lightning provides the processes and the process group.

Everything that depends on how the model is distributed lives in :class:`Parallel`: the module the
step runs, the gradient-sync context of a micro-batch, and whole (gathered) state dicts for
checkpoints, so the training code reads the same on one process, DDP or FSDP.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel


class Parallel:
    """A model as it runs: alone (``network`` is the model), under DDP, or sharded by FSDP2."""

    def __init__(self, model: torch.nn.Module, network: torch.nn.Module | None = None,
                 sharded: bool = False) -> None:
        self.model = model
        self.network = network if network is not None else model
        self.sharded = sharded

    def gradient_sync(self, enabled: bool):
        """The context of one micro-batch's backward: gradients are reduced across ranks only when
        ``enabled`` (the step's last micro-batch), once per optimizer step."""
        if self.sharded:
            self.model.set_requires_gradient_sync(enabled)
        elif isinstance(self.network, DistributedDataParallel) and not enabled:
            return self.network.no_sync()
        return nullcontext()

    def full_model_state(self) -> dict:
        """The whole model state dict on CPU (every rank must call it; sharded: rank 0 gets it)."""
        if not self.sharded:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state dict in torch's usual layout (parameters numbered in group order),
        whole, whatever the strategy: it loads on any world size (every rank must call it)."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        by_name = get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if not by_name:  # ranks other than 0
            return {}
        return _rekey(by_name, {n: i for i, n in enumerate(self._parameter_names(optimizer))})

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if not self.sharded:
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


def parallelize(model: torch.nn.Module, *, shard: bool, **ddp_kwargs: Any) -> Parallel:
    """DDP around the model (``shard=False``) or FSDP2's ``fully_shard`` on each layer and on the rest
    (embeddings, tied vocabulary projection, head). Call inside an initialised process group."""
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return Parallel(model, sharded=True)
    return Parallel(model, DistributedDataParallel(model, **ddp_kwargs))


def _rekey(optimizer_state: dict, key: dict) -> dict:
    """An optimizer state dict with its parameter keys mapped through ``key`` (names <-> numbers)."""
    return {"state": {key[k]: v for k, v in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [key[k] for k in group["params"]]}
                             for group in optimizer_state["param_groups"]]}


class StepSyncDDPStrategy(DDPStrategy):
    """Lightning's DDP launch and process group, with the network parallelised by
    :func:`parallelize` (not Lightning's wrapper around the whole LightningModule, whose single
    forward cannot hold the several backward passes of a step's micro-batches)."""

    def __init__(self, *args, shard: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shard = shard

    def configure_ddp(self) -> None:
        module = self.lightning_module
        kwargs = {} if self.shard else {"device_ids": self.determine_ddp_device_ids(),
                                        "broadcast_buffers": False, **self._ddp_kwargs}
        module.parallel = parallelize(module.model, shard=self.shard, **kwargs)


def cluster_plugins() -> list:
    """Inside a SLURM batch job, take ranks from SLURM; requeue is ettin's own (preemption.py)."""
    if SLURMEnvironment.detect() and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return [SLURMEnvironment(auto_requeue=False)]
    return []
