"""One phase of a run, built from parts a test can call alone: the tokenizer and the phase's checked
data, the model, the step settings, the Lightning module, its data, its callbacks and its trainer;
``run_phase`` puts them together and trains."""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ettin.data.loader import LoaderState, StepBatch, StepBatches, validation_batches
from ettin.model.config import ModelConfig
from ettin.model.modernbert import ModernBert
from ettin.objectives.collate import MaskRate
from ettin.optim.schedule import phase_batch_schedule, phase_lr_multiplier
from ettin.store.rundir import RunDir
from ettin.train.checkpoint import StartState
from ettin.train.config import ConfigError, TrainConfig
from ettin.train.environment import is_rank_zero, trainer_devices
from ettin.train.step import StepSettings

log = logging.getLogger("ettin")


# ---------------------------------------------------------------------------------------------------
# Tokenizer and data


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


def resolve_sources(cfg: TrainConfig, phase: str, tokenizer) -> list:
    """The phase's sources, checked; ``builtin`` prepares the built-in corpus if needed."""
    from ettin.data.corpus import builtin_data_path
    from ettin.data.formats import check_released_continuation, check_sources
    from ettin.data.prepare import ensure_prepared
    from ettin.store.fs import is_complete

    seq_len = cfg.phases[phase].seq_len
    sources = []
    for source in cfg.data[phase]:
        path = source.path
        if path == "builtin":
            path = str(builtin_data_path(cfg.data_dir, seq_len))
            if is_rank_zero() and not is_complete(path):
                log.info("preparing the built-in corpus for %d-token rows into %s", seq_len, path)
            ensure_prepared(
                input="builtin", output=path, tokenizer=tokenizer, max_seq_len=seq_len,
                wait=not is_rank_zero(),
            )
        sources.append(replace(source, path=path))
    # The loader's own checks, at start: a clear error before any process is spawned.
    try:
        _, devices = trainer_devices(cfg.trainer.accelerator, cfg.trainer.devices)
        check_sources(sources, seq_len, tokenizer, phase_tokens=cfg.phases[phase].tokens,
                      world_size=devices * cfg.trainer.num_nodes)
        # The phase init continues (checked when the run starts, not on every resume).
        if cfg.init_revision and phase == cfg.phases_to_run()[0] and \
                RunDir(cfg.run_dir).latest_checkpoint() is None:
            check_released_continuation(cfg.init, cfg.init_revision, sources, tokenizer)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise ConfigError(f"data of phase {phase}: {error}") from None
    return sources


def check_phases_data(cfg: TrainConfig, tokenizer) -> dict[str, list]:
    """Every phase's data, checked before the first step (a missing extension folder must not wait
    for the end of pretraining to fail)."""
    return {phase: resolve_sources(cfg, phase, tokenizer) for phase in cfg.phases_to_run()}


def data_identity(cfg: TrainConfig, phase: str, sources: list) -> dict:
    """What decides the tokens a phase sees, in order: recorded in every checkpoint so two runs can be
    proven to have seen the same data (ettin.report.identity)."""
    from ettin.data.formats import prepared_fingerprint

    p = cfg.phases[phase]
    return {
        "seed": cfg.seed, "phase": phase, "seq_len": p.seq_len, "global_batch": cfg.global_batch,
        "batch_warmup_tokens": p.batch_warmup_tokens, "batch_warmup_min": p.batch_warmup_min,
        # Every field of each source (the replay of ettin.compare rebuilds them as they trained).
        "sources": [{**asdict(s), "path": s.path if "://" in s.path else str(Path(s.path).resolve()),
                     "fingerprint": prepared_fingerprint(s.path)} for s in sources],
    }


# ---------------------------------------------------------------------------------------------------
# Model, step and module


def run_model_config(cfg: TrainConfig, phase: str, tokenizer) -> ModelConfig:
    """The recipe's model with the vocabulary and special ids of the run's tokenizer."""
    from ettin.data.tokenizer import check_vocab, special_ids

    ids = special_ids(tokenizer)
    vocab = cfg.model.get("vocab_size") or -(-len(tokenizer) // 64) * 64
    check_vocab(tokenizer, vocab)
    config = cfg.model_config(phase)
    return replace(
        config, vocab_size=vocab, pad_token_id=ids.pad, bos_token_id=ids.cls,
        eos_token_id=ids.sep, mask_token_id=ids.mask,
    )


def build_model(cfg: TrainConfig, phase: str, tokenizer, start: StartState) -> ModernBert:
    """The phase's model: initial weights from the seed alone, or the start's; speedups applied."""
    from ettin.parallel.speedups import apply_speedups
    from ettin.train.start import load_model_state

    accelerator, _ = trainer_devices(cfg.trainer.accelerator, cfg.trainer.devices)
    loss = cfg.trainer.loss_implementation
    torch.manual_seed(cfg.seed)
    model = ModernBert(run_model_config(cfg, phase, tokenizer), loss_implementation=loss if loss != "auto"
                       else ("chunked" if accelerator == "gpu" else "plain"))
    if start.model_state is not None:
        load_model_state(model, start.model_state, start.description)
    apply_speedups(model, compile=cfg.trainer.compile,
                   activation_checkpointing=cfg.trainer.activation_checkpointing)
    return model


def step_settings(cfg: TrainConfig, phase: str, *, fresh_optimizer: bool) -> StepSettings:
    p = cfg.phases[phase]
    return StepSettings(
        lr=cfg.optim.lr * p.lr_scale, peak_lr=cfg.optim.lr,
        lr_multiplier=phase_lr_multiplier(p, fresh_optimizer=fresh_optimizer),
        weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        loss_normalization=cfg.optim.loss_normalization, group_weights=cfg.phase_mix(phase).weights,
    )


def build_module(cfg: TrainConfig, phase: str, model: ModernBert, start: StartState):
    """The LightningModule of the phase, continuing from ``start``'s counters, RNGs and moments."""
    from ettin.model.flops import peak_flops_per_device
    from ettin.train.callbacks import restore_rng
    from ettin.train.module import EttinModule

    # A checkpoint written before data digests resumes with the digest unknown, not restarted.
    loader_state = LoaderState(**{"data_digest": None, **start.loader_state}) if start.loader_state \
        else LoaderState()

    def start_rng(module: EttinModule) -> None:
        rank, world = module.global_rank, module.trainer.world_size
        if start.rng_states is not None:
            restore_rng(start.rng_states, rank, world, seed=cfg.seed + loader_state.step)
        else:
            torch.manual_seed(cfg.seed * 1000 + rank)

    accelerator, _ = trainer_devices(cfg.trainer.accelerator, cfg.trainer.devices)
    return EttinModule(
        model, objective=cfg.phase_mix(phase),
        settings=step_settings(cfg, phase, fresh_optimizer=start.fresh_optimizer),
        phase_tokens=cfg.phases[phase].tokens, loader_state=loader_state,
        optimizer_state=start.optimizer_state,
        peak_flops=peak_flops_per_device() if accelerator == "gpu" else None,
        log_every_steps=cfg.trainer.log_every_steps, on_train_start_fn=start_rng,
    )


# ---------------------------------------------------------------------------------------------------
# Data for Lightning


def phase_mask_rate(cfg: TrainConfig, phase: str) -> MaskRate:
    """The phase's training mask rate: ``mask_rate`` at its start, ``final_mask_rate`` at its end."""
    p = cfg.phases[phase]
    end = p.mask_rate if p.final_mask_rate is None else p.final_mask_rate
    return MaskRate(p.mask_rate, end, p.tokens)


def _init_worker(worker_id: int) -> None:
    from ettin.train.preemption import default_stop_signals

    torch.set_num_threads(1)  # a data-loader worker collates on the host; it must not compete
    default_stop_signals()


class PhaseData(L.LightningDataModule):
    """The phase's training steps for this rank, from ``loader_state`` on."""

    def __init__(self, cfg: TrainConfig, phase: str, tokenizer, sources: list,
                 loader_state: LoaderState) -> None:
        super().__init__()
        self.cfg, self.phase, self.tokenizer, self.sources = cfg, phase, tokenizer, sources
        self.loader_state = loader_state

    def step_batches(self, rank: int, world_size: int) -> StepBatches:
        cfg, p = self.cfg, self.cfg.phases[self.phase]
        return StepBatches(
            self.sources, split="train", seq_len=p.seq_len,
            collator=cfg.phase_mix(self.phase).collator(
                self.tokenizer, mask_rate=phase_mask_rate(cfg, self.phase), seed=cfg.seed),
            global_batch_at=phase_batch_schedule(p, cfg.global_batch), micro_batch_size=p.micro_batch,
            rank=rank, world_size=world_size, seed=cfg.seed, phase=self.phase,
            state=self.loader_state, pack=cfg.packs_micro_batches(),
        )

    def train_dataloader(self) -> DataLoader:
        accelerator, _ = trainer_devices(self.cfg.trainer.accelerator, self.cfg.trainer.devices)
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG, which
        # would shift the dropout stream restored from a checkpoint.
        return DataLoader(self.step_batches(self.trainer.global_rank, self.trainer.world_size),
                          batch_size=None, num_workers=self.cfg.trainer.num_workers,
                          pin_memory=accelerator == "gpu", persistent_workers=False,
                          worker_init_fn=_init_worker,
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    def on_before_batch_transfer(self, batch: StepBatch, dataloader_idx: int) -> StepBatch:
        return batch.count_on_host()


def phase_validation_batches(cfg: TrainConfig, phase: str, tokenizer, sources: list, *, rank: int,
                             world_size: int) -> list[list]:
    """The phase's fixed validation set for this rank (the same samples and masks every time), as
    each objective of its mix collates it: every objective is measured on all validation rows."""
    p = cfg.phases[phase]
    return [validation_batches(sources, seq_len=p.seq_len, batch_size=p.micro_batch,
                               collator=objective.collator(tokenizer, mask_rate=cfg.trainer.val_mask_rate,
                                                           seed=cfg.seed),
                               max_samples=cfg.trainer.val_samples, rank=rank, world_size=world_size)
            for objective in cfg.phase_mix(phase).members]


# ---------------------------------------------------------------------------------------------------
# Trainer


def build_trainer(cfg: TrainConfig, callbacks: list, loggers: list) -> L.Trainer:
    from ettin.parallel.distributed import StepSyncDDPStrategy, cluster_plugins

    accelerator, devices = trainer_devices(cfg.trainer.accelerator, cfg.trainer.devices)
    world = devices * cfg.trainer.num_nodes
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    strategy: Any = "auto"
    if world > 1:
        strategy = StepSyncDDPStrategy(
            shard=cfg.trainer.strategy == "fsdp",
            process_group_backend="nccl" if accelerator == "gpu" else "gloo",
            timeout=timedelta(seconds=cfg.trainer.process_group_timeout_s),
        )
    return L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=cfg.trainer.num_nodes,
        strategy=strategy, precision=precision, max_epochs=1, logger=loggers or False,
        callbacks=callbacks, enable_checkpointing=False, enable_model_summary=False,
        log_every_n_steps=cfg.trainer.log_every_steps, num_sanity_val_steps=0,
        use_distributed_sampler=False, default_root_dir=cfg.run_dir, plugins=cluster_plugins(),
    )


def run_phase(cfg: TrainConfig, phase: str, tokenizer, start: StartState, sources: list) -> Path:
    """Train one phase from ``start`` on its checked ``sources``; returns the phase-end checkpoint."""
    from ettin.train.callbacks import CheckpointCallback, ValidationCallback, progress_callback
    from ettin.train.loggers import build_loggers
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ettin.train.preemption import Preempted, PreemptionHandler, Stopped
    from ettin.train.start import checkpointer

    p = cfg.phases[phase]
    model = build_model(cfg, phase, tokenizer, start)
    module = build_module(cfg, phase, model, start)
    started_at = module.loader_state
    checkpoints = CheckpointCallback(
        cfg, phase, tokenizer, checkpointer(cfg), every_tokens=p.checkpoint_every_tokens,
        start_tokens=started_at.tokens, fresh_optimizer=start.fresh_optimizer,
        data_identity=data_identity(cfg, phase, sources))
    validation = ValidationCallback(
        lambda m: phase_validation_batches(cfg, phase, tokenizer, sources, rank=m.global_rank,
                                           world_size=m.trainer.world_size),
        every_tokens=p.val_every_tokens, start_tokens=started_at.tokens)
    preemption = PreemptionHandler(
        save_fn=lambda trainer: checkpoints.save(trainer.lightning_module, kind="preemption"),
        timeout=timedelta(seconds=cfg.trainer.process_group_timeout_s))
    progress = progress_callback(phase, p.tokens, started_at.tokens)
    trainer = build_trainer(cfg, callbacks=[validation, checkpoints, preemption, progress],
                            loggers=build_loggers(cfg, phase, cfg.phase_mix(phase),
                                                  resume_step=started_at.step))
    log.info("phase %s: %s", phase, start.description)
    log.info("model: %s, %s parameters, attention backend %s, %s, objective %s; %s",
             cfg.size, f"{model.num_parameters():,}", model.config.attn_implementation,
             "causal" if model.config.causal else "bidirectional", cfg.phase_mix(phase).name,
             cfg.micro_batches_described(phase))
    try:
        trainer.fit(module, datamodule=PhaseData(cfg, phase, tokenizer, sources, started_at))
    except (Stopped, SIGTERMException) as error:
        # SIGTERMException (a SystemExit of status 0): Lightning's own stop on SIGTERM, where
        # stop_on_signals is not in force (train() called from Python); a stop all the same.
        stop = error if isinstance(error, Stopped) else Stopped(signal.SIGTERM)
        stop.tokens, stop.phase = module.loader_state.tokens, phase
        raise stop from None
    if preemption.preempted:
        raise Preempted(f"preempted in phase {phase}; the checkpoint is saved and the job requeued")
    if module.loader_state.tokens < p.tokens:
        raise RuntimeError(
            f"phase {phase} stopped at {module.loader_state.tokens:,} of {p.tokens:,} tokens "
            "(interrupted); run the same command again to resume"
        )
    validation.validate(module)
    return checkpoints.save(module, kind="phase_end")
