"""One phase of a run, built from parts a test can call alone: the run's tokenizer, then from the
phase's ``PhasePlan`` (ettin.train.plan, resolved once) the model, the Lightning module, its data
and its trainer; ``run_phase`` resolves the plan, puts them together and
trains."""

from __future__ import annotations

import logging
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ettin.data.loader import LoaderState, StepBatch, StepBatches
from ettin.model.modernbert import ModernBert
from ettin.train.checkpoint import StartState
from ettin.train.config import TrainConfig, to_yaml
from ettin.train.environment import is_rank_zero, trainer_devices
from ettin.train.plan import PhasePlan, plan_phase

log = logging.getLogger("ettin")


# ---------------------------------------------------------------------------------------------------
# Tokenizer (a run's, shared by its phases)


def resolve_tokenizer(cfg: TrainConfig):
    """The tokenizer of the run; ``builtin`` trains the tiny offline one when it is missing."""
    from ettin.data.tokenizer import ensure_builtin_tokenizer, load_tokenizer

    if cfg.tokenizer == "builtin":
        directory = Path(cfg.data_dir) / "tokenizer-builtin"
        if not is_rank_zero():  # rank 0 trains it; the others wait for the finished folder
            while not (directory / "tokenizer.json").exists():
                time.sleep(1.0)
            return load_tokenizer(str(directory))
        if not (directory / "tokenizer.json").exists():
            log.info("training the built-in tokenizer on the built-in corpus into %s", directory)
        return ensure_builtin_tokenizer(directory)
    return load_tokenizer(cfg.tokenizer)


# ---------------------------------------------------------------------------------------------------
# Model and module


def build_model(plan: PhasePlan, start: StartState) -> ModernBert:
    """The phase's model: initial weights from the seed alone, or the start's; speedups applied."""
    from ettin.parallel.speedups import apply_speedups
    from ettin.train.start import load_model_state

    accelerator, _ = trainer_devices(plan.trainer.accelerator, plan.trainer.devices)
    loss = plan.trainer.loss_implementation
    torch.manual_seed(plan.seed)
    model = ModernBert(plan.model, loss_implementation=loss if loss != "auto"
                       else ("chunked" if accelerator == "gpu" else "plain"))
    if start.model_state is not None:
        load_model_state(model, start.model_state, start.description)
    apply_speedups(model, compile=plan.trainer.compile,
                   activation_checkpointing=plan.trainer.activation_checkpointing)
    return model


def build_module(plan: PhasePlan, model: ModernBert, start: StartState):
    """The LightningModule of the phase, continuing from ``start``'s counters, RNGs and moments."""
    from ettin.model.flops import peak_flops_per_device
    from ettin.train.callbacks import restore_rng
    from ettin.train.module import EttinModule

    loader_state = LoaderState.resumed(start.loader_state)

    def start_rng(module: EttinModule) -> None:
        rank, world = module.global_rank, module.trainer.world_size
        if start.rng_states is not None:
            restore_rng(start.rng_states, rank, world, seed=plan.seed + loader_state.step)
        else:
            torch.manual_seed(plan.seed * 1000 + rank)

    accelerator, _ = trainer_devices(plan.trainer.accelerator, plan.trainer.devices)
    return EttinModule(
        model, objective=plan.mix, settings=plan.settings, phase_tokens=plan.tokens,
        loader_state=loader_state, optimizer_state=start.optimizer_state,
        peak_flops=peak_flops_per_device() if accelerator == "gpu" else None,
        log_every_steps=plan.intervals.log_every_steps, on_train_start_fn=start_rng,
    )


# ---------------------------------------------------------------------------------------------------
# Data for Lightning


def _init_worker(worker_id: int) -> None:
    from ettin.train.preemption import default_stop_signals

    torch.set_num_threads(1)  # a data-loader worker collates on the host; it must not compete
    default_stop_signals()


class PhaseData(L.LightningDataModule):
    """The phase's training steps for this rank, from ``loader_state`` on."""

    def __init__(self, plan: PhasePlan, tokenizer, loader_state: LoaderState) -> None:
        super().__init__()
        self.plan, self.tokenizer, self.loader_state = plan, tokenizer, loader_state

    def step_batches(self, rank: int, world_size: int) -> StepBatches:
        plan = self.plan
        return StepBatches(
            list(plan.sources), split="train", seq_len=plan.seq_len,
            collator=plan.mix.collator(self.tokenizer, mask_rate=plan.mask_rate, seed=plan.seed),
            global_batch_at=plan.batch_schedule, micro_batch_size=plan.micro_batch,
            rank=rank, world_size=world_size, seed=plan.seed, phase=plan.phase,
            state=self.loader_state, pack=plan.pack,
        )

    def train_dataloader(self) -> DataLoader:
        accelerator, _ = trainer_devices(self.plan.trainer.accelerator, self.plan.trainer.devices)
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG, which
        # would shift the dropout stream restored from a checkpoint.
        return DataLoader(self.step_batches(self.trainer.global_rank, self.trainer.world_size),
                          batch_size=None, num_workers=self.plan.trainer.num_workers,
                          pin_memory=accelerator == "gpu", persistent_workers=False,
                          worker_init_fn=_init_worker,
                          generator=torch.Generator().manual_seed(self.plan.seed))

    def on_before_batch_transfer(self, batch: StepBatch, dataloader_idx: int) -> StepBatch:
        return batch.count_on_host()


# ---------------------------------------------------------------------------------------------------
# Trainer


def build_trainer(plan: PhasePlan, callbacks: list, loggers: list) -> L.Trainer:
    from ettin.parallel.distributed import StepSyncDDPStrategy, cluster_plugins

    trainer = plan.trainer
    accelerator, devices = trainer_devices(trainer.accelerator, trainer.devices)
    world = devices * trainer.num_nodes
    precision = trainer.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    strategy: Any = "auto"
    if world > 1:
        strategy = StepSyncDDPStrategy(
            shard=trainer.strategy == "fsdp",
            process_group_backend="nccl" if accelerator == "gpu" else "gloo",
            timeout=timedelta(seconds=trainer.process_group_timeout_s),
        )
    return L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=trainer.num_nodes,
        strategy=strategy, precision=precision, max_epochs=1, logger=loggers or False,
        callbacks=callbacks, enable_checkpointing=False, enable_model_summary=False,
        log_every_n_steps=plan.intervals.log_every_steps, num_sanity_val_steps=0,
        use_distributed_sampler=False, default_root_dir=plan.run_dir, plugins=cluster_plugins(),
    )


def run_phase(cfg: TrainConfig, phase: str, tokenizer, start: StartState, sources: list) -> Path:
    """Train one phase from ``start`` on its checked ``sources``; returns the phase-end checkpoint.
    The phase is resolved here, once, into its ``PhasePlan``; everything below takes the plan."""
    from ettin.train.callbacks import CheckpointCallback, ValidationCallback, progress_callback
    from ettin.train.loggers import build_loggers
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ettin.train.preemption import Preempted, PreemptionHandler, Stopped
    from ettin.train.start import checkpointer

    plan = plan_phase(cfg, phase, tokenizer, sources, fresh_optimizer=start.fresh_optimizer)
    model = build_model(plan, start)
    module = build_module(plan, model, start)
    started_at = module.loader_state
    checkpoints = CheckpointCallback(plan, tokenizer, checkpointer(cfg), config_yaml=to_yaml(cfg),
                                     start_tokens=started_at.tokens)
    validation = ValidationCallback(plan, tokenizer, start_tokens=started_at.tokens)
    preemption = PreemptionHandler(
        save_fn=lambda trainer: checkpoints.save(trainer.lightning_module, kind="preemption"),
        timeout=timedelta(seconds=plan.trainer.process_group_timeout_s))
    progress = progress_callback(phase, plan.tokens, started_at.tokens)
    trainer = build_trainer(plan, callbacks=[validation, checkpoints, preemption, progress],
                            loggers=build_loggers(plan, resume_step=started_at.step))
    log.info("phase %s: %s", phase, start.description)
    log.info("model: %s, %s parameters, attention backend %s, %s, objective %s; %s",
             cfg.size, f"{model.num_parameters():,}", model.config.attn_implementation,
             "causal" if model.config.causal else "bidirectional", plan.mix.name,
             plan.micro_batches_described())
    try:
        trainer.fit(module, datamodule=PhaseData(plan, tokenizer, started_at))
    except (Stopped, SIGTERMException) as error:
        # SIGTERMException (a SystemExit of status 0): Lightning's own stop on SIGTERM, where
        # stop_on_signals is not in force (train() called from Python); a stop all the same.
        stop = error if isinstance(error, Stopped) else Stopped(signal.SIGTERM)
        stop.tokens, stop.phase = module.loader_state.tokens, phase
        raise stop from None
    if preemption.preempted:
        raise Preempted(f"preempted in phase {phase}; the checkpoint is saved and the job requeued")
    if module.loader_state.tokens < plan.tokens:
        raise RuntimeError(
            f"phase {phase} stopped at {module.loader_state.tokens:,} of {plan.tokens:,} tokens "
            "(interrupted); run the same command again to resume"
        )
    validation.validate(module)
    return checkpoints.save(module, kind="phase_end")
