"""A tiny Lightning training for tests/test_slurm.py, independent of ettin.train.run.

    python tests/slurm_tiny_train.py RUN_DIR --steps N [--step-sleep S] [--die-rank R --die-at-step K]
        [--hang-rank R --hang-at-step K] [--timeout-s T]

It uses the same pieces as ettin.train.run under SLURM: ``check_topology``, SLURMEnvironment without
Lightning's auto-requeue, DDP over gloo with a collective timeout, and ``PreemptionHandler`` with a
checkpoint save of its own. Step k trains a linear model on a batch that is a function of k only, so
an interrupted-and-resumed run must end with exactly the weights of a straight one
(:func:`reference_weights`). Writes ``RUN_DIR/progress`` (last finished step), ``RUN_DIR/losses.txt``
(``step loss`` per step, appended by rank 0) and ``RUN_DIR/final.pt`` (rank 0, at the end).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

GLOBAL_BATCH = 8
FEATURES = 4
LR = 0.05


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, FEATURES, generator=g)
    y = x @ torch.arange(1.0, FEATURES + 1.0).unsqueeze(1) + 0.5
    return x, y


def new_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, 1)


def reference_weights(steps: int) -> dict[str, torch.Tensor]:
    """The weights after ``steps`` steps of one process on the whole global batch."""
    model = new_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(steps):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--die-rank", type=int, default=-1)
    p.add_argument("--die-at-step", type=int, default=-1)
    p.add_argument("--hang-rank", type=int, default=-1)
    p.add_argument("--hang-at-step", type=int, default=-1)
    p.add_argument("--timeout-s", type=float, default=60.0)
    args = p.parse_args()

    from ettin.train import preemption
    from ettin.train.topology import check_topology

    preemption.install()  # first thing: a SIGUSR1 during start-up must not kill the process

    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    world = int(os.environ.get("SLURM_NTASKS", "1"))
    nodes = int(os.environ.get("SLURM_NNODES", "1"))
    check_topology(world, devices_per_node=world // nodes, num_nodes=nodes)
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "ckpt.pt"
    start = torch.load(ckpt, weights_only=True) if ckpt.exists() else None
    start_step = start["step"] if start else 0

    class Steps(torch.utils.data.IterableDataset):
        def __init__(self, rank: int, world_size: int) -> None:
            self.rank, self.world_size = rank, world_size

        def __iter__(self):
            for step in range(start_step, args.steps):
                x, y = batch(step)
                yield step, x[self.rank::self.world_size], y[self.rank::self.world_size]

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = new_model()
            if start:
                self.model.load_state_dict(start["model"])
            self.step = start_step  # the global step of the next batch

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
            if start:
                optimizer.load_state_dict(start["optimizer"])
            return optimizer

        def train_dataloader(self):
            ds = Steps(self.global_rank, self.trainer.world_size)
            return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)

        def training_step(self, item, batch_idx):
            step, x, y = item
            if self.global_rank == args.die_rank and step == args.die_at_step:
                print(f"rank {self.global_rank} dies alone at step {step}", flush=True)
                os._exit(7)
            if self.global_rank == args.hang_rank and step == args.hang_at_step:
                print(f"rank {self.global_rank} hangs alone at step {step}", flush=True)
                time.sleep(3600)
            loss = torch.nn.functional.mse_loss(self.model(x), y)
            self.step = int(step) + 1
            if self.global_rank == 0:
                # the loss of the whole global batch, before this step's update
                with torch.no_grad():
                    xa, ya = batch(int(step))
                    full = torch.nn.functional.mse_loss(self.model(xa), ya).item()
                with open(run_dir / "losses.txt", "a") as f:
                    f.write(f"{int(step)} {full:.8f}\n")
            time.sleep(args.step_sleep)
            return loss

        def on_train_batch_end(self, outputs, item, batch_idx):
            if self.global_rank == 0:
                (run_dir / "progress").write_text(str(self.step))

    module = Tiny()

    def save(trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            tmp = run_dir / "ckpt.pt.tmp"
            torch.save({"step": module.step, "model": module.model.state_dict(),
                        "optimizer": trainer.optimizers[0].state_dict()}, tmp)
            os.replace(tmp, ckpt)
            print(f"checkpoint at step {module.step}", flush=True)
        trainer.strategy.barrier()

    handler = preemption.PreemptionHandler(save_fn=save, timeout=timedelta(seconds=args.timeout_s))
    plugins = [SLURMEnvironment(auto_requeue=False)] if "SLURM_NTASKS" in os.environ else []
    trainer = L.Trainer(
        accelerator="cpu", devices=world // nodes, num_nodes=nodes,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=args.timeout_s))
        if world > 1 else "auto",
        plugins=plugins, callbacks=[handler], max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )
    print(f"rank {int(os.environ.get('SLURM_PROCID', 0))}: starting at step {start_step}", flush=True)
    trainer.fit(module)
    if handler.preempted:
        print(f"rank {trainer.global_rank}: preempted at step {module.step}, requeued={handler.requeued}",
              flush=True)
        return 0
    if trainer.is_global_zero:
        torch.save({"step": module.step, "model": module.model.state_dict()}, run_dir / "final.pt")
        print(f"finished at step {module.step}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's slow teardown of torch (seconds on 2 cores)
