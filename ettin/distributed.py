"""Distribution applied from outside the model (Lightning provides processes and process groups)."""

from __future__ import annotations

import os

from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy


class StepSyncDDPStrategy(DDPStrategy):
    """Lightning's DDP launch and process group, with DDP wrapped around the network only.

    A training batch is a whole optimizer step of several micro-batches; the module runs all but the
    last under ``no_sync`` so gradients are all-reduced once per step. (Lightning would wrap the whole
    LightningModule, whose single forward cannot contain several backward passes.) ``shard``: FSDP2
    (``fully_shard`` per layer) instead of DDP, gradients reduce-scattered once per step.
    """

    def __init__(self, *args, shard: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shard = shard

    def configure_ddp(self) -> None:
        if self.shard:  # trainer.strategy=fsdp: FSDP2 instead of DDP, the same process group
            self.lightning_module.shard()
            return
        kwargs = {"broadcast_buffers": False, **self._ddp_kwargs}
        self.lightning_module.wrap_ddp(device_ids=self.determine_ddp_device_ids(), **kwargs)


def cluster_plugins() -> list:
    """Inside a SLURM batch job, take ranks from SLURM; requeue is ettin's own (preemption.py)."""
    if SLURMEnvironment.detect() and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return [SLURMEnvironment(auto_requeue=False)]
    return []
