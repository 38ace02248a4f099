"""A phase's plan: everything one phase of a run trains with, resolved once from the config.

``plan_phase(cfg, phase, tokenizer, sources, fresh_optimizer=...)`` is the one place that reads a
phase out of the ``TrainConfig``: the model config (with the tokenizer's vocabulary and special ids),
the objective mix with each objective's attention spec, the mask-rate schedule, the optimizer step's
``StepSettings``, the batch-size schedule, the checked data sources and their identity, and the
checkpoint / validation / log intervals. The builders, callbacks, loggers and the data loader of
ettin.train.phase take the plan, never ``(cfg, phase)``; the plan as plain data
(``PhasePlan.as_dict``) is written into every checkpoint's meta.json, where the report reads it back
(ettin.report.runs) instead of resolving config.yaml again.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from ettin.data.source import DataSource
from ettin.model.config import ModelConfig
from ettin.objectives import ObjectiveMix
from ettin.objectives.collate import MaskRate
from ettin.optim.schedule import BatchSizeWarmup, phase_batch_schedule, phase_lr_multiplier
from ettin.store.rundir import RunDir
from ettin.train.config import ConfigError, LoggingConfig, PhaseConfig, TrainConfig, TrainerConfig
from ettin.train.environment import is_rank_zero, trainer_devices
from ettin.train.step import StepSettings

log = logging.getLogger("ettin")

PLAN_FORMAT = "ettin-phase-plan/1"


@dataclass(frozen=True)
class Intervals:
    """When the phase checkpoints and validates (tokens of the phase; 0: never mid-phase) and logs
    (optimizer steps)."""

    checkpoint_every_tokens: int
    val_every_tokens: int
    log_every_steps: int


@dataclass(frozen=True)
class PhasePlan:
    """One phase of a run, resolved (see the module docstring)."""

    run_name: str
    recipe: str
    run_dir: Path
    phase: str
    index: int  # in the recipe's phase order
    seed: int
    phase_config: PhaseConfig  # the phase's keys as trained (tokens, seq_len, micro_batch, ...)
    model: ModelConfig  # with the run tokenizer's vocabulary and special ids
    mix: ObjectiveMix  # each member an Objective with its attention spec
    export_as: Optional[str]  # the run's export_as (the mix's side when set)
    mask_rate: MaskRate  # the training mask rate over the phase's tokens
    val_mask_rate: float
    val_samples: int
    settings: StepSettings
    global_batch: int
    batch_schedule: BatchSizeWarmup
    pack: bool  # micro-batches packed to micro_batch * seq_len tokens
    sources: tuple[DataSource, ...]  # checked; builtin resolved to its prepared folder
    data_identity: dict  # what decides the tokens the phase sees, in order (ettin.report.identity)
    intervals: Intervals
    fresh_optimizer: bool  # the phase began with zero Adam moments
    trainer: TrainerConfig  # the run's devices, precision, workers (the same for every phase)
    logging: LoggingConfig

    @property
    def tokens(self) -> int:
        return self.phase_config.tokens

    @property
    def seq_len(self) -> int:
        return self.phase_config.seq_len

    @property
    def micro_batch(self) -> int:
        return self.phase_config.micro_batch

    @property
    def objective(self):
        """The objective the phase's model is (its direction, its export): the mix's."""
        return self.mix.objective

    def micro_batches_described(self) -> str:
        if self.pack:
            return f"packed micro-batches of up to {self.micro_batch * self.seq_len:,} tokens"
        return f"micro-batches of {self.micro_batch} rows"

    def validation_batches(self, tokenizer, *, rank: int, world_size: int) -> list[list]:
        """The phase's fixed validation set for this rank (the same samples and masks every time), as
        each objective of its mix collates it: every objective is measured on all validation rows."""
        from ettin.data.loader import validation_batches

        return [validation_batches(list(self.sources), seq_len=self.seq_len, batch_size=self.micro_batch,
                                   collator=objective.collator(tokenizer, mask_rate=self.val_mask_rate,
                                                               seed=self.seed),
                                   max_samples=self.val_samples, rank=rank, world_size=world_size)
                for objective in self.mix.members]

    def as_dict(self) -> dict:
        """The plan as plain data (JSON), for a checkpoint's meta.json: what the report reads back."""
        s = self.settings
        return {
            "format": PLAN_FORMAT, "run_name": self.run_name, "recipe": self.recipe, "phase": self.phase,
            "index": self.index, "seed": self.seed, "phase_config": asdict(self.phase_config),
            "model": asdict(self.model),
            # Members as a list: their order is the mix's (its loss groups'), and meta.json sorts keys.
            "objective_mix": {"name": self.mix.name, "side": self.mix.side, "export_as": self.export_as,
                              "members": [{"objective": m.name, "weight": w, "attention": m.attention.value}
                                          for m, w in zip(self.mix.members, self.mix.given_weights)]},
            "mask_rate": asdict(self.mask_rate), "val_mask_rate": self.val_mask_rate,
            "val_samples": self.val_samples,
            "step_settings": {"lr": s.lr, "peak_lr": s.peak_lr, "weight_decay": s.weight_decay,
                              "betas": list(s.betas), "eps": s.eps, "loss_normalization": s.loss_normalization,
                              "group_weights": list(s.group_weights)},
            "global_batch": self.global_batch, "batch_schedule": asdict(self.batch_schedule), "pack": self.pack,
            "data": self.data_identity, "intervals": asdict(self.intervals),
            "fresh_optimizer": self.fresh_optimizer,
        }


def plan_phase(cfg: TrainConfig, phase: str, tokenizer, sources: list, *,
               fresh_optimizer: bool) -> PhasePlan:
    """``phase`` of ``cfg`` resolved once, on its checked ``sources`` (``check_phases_data``), for a
    start with fresh (zero) or restored Adam moments. Without a ``tokenizer`` (preflight: synthetic
    rows, no data) the model keeps the size table's vocabulary."""
    p = cfg.phases[phase]
    return PhasePlan(
        run_name=cfg.run_name, recipe=cfg.recipe, run_dir=cfg.run_dir, phase=phase,
        index=cfg.phase_order.index(phase), seed=cfg.seed, phase_config=p,
        model=run_model_config(cfg, phase, tokenizer) if tokenizer is not None else cfg.model_config(phase),
        mix=cfg.phase_mix(phase), export_as=cfg.export_as,
        mask_rate=phase_mask_rate(p), val_mask_rate=cfg.trainer.val_mask_rate,
        val_samples=cfg.trainer.val_samples,
        settings=step_settings(cfg, phase, fresh_optimizer=fresh_optimizer),
        global_batch=cfg.global_batch, batch_schedule=phase_batch_schedule(p, cfg.global_batch),
        pack=cfg.packs_micro_batches(), sources=tuple(sources),
        data_identity=data_identity(cfg, phase, sources),
        intervals=Intervals(p.checkpoint_every_tokens, p.val_every_tokens, cfg.trainer.log_every_steps),
        fresh_optimizer=fresh_optimizer, trainer=cfg.trainer, logging=cfg.logging,
    )


# ---------------------------------------------------------------------------------------------------
# The resolutions a plan is made of (also what dry_run and preflight show)


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


def step_settings(cfg: TrainConfig, phase: str, *, fresh_optimizer: bool) -> StepSettings:
    p = cfg.phases[phase]
    return StepSettings(
        lr=cfg.optim.lr * p.lr_scale, peak_lr=cfg.optim.lr,
        lr_multiplier=phase_lr_multiplier(p, fresh_optimizer=fresh_optimizer),
        weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        loss_normalization=cfg.optim.loss_normalization, group_weights=cfg.phase_mix(phase).weights,
    )


def phase_mask_rate(p: PhaseConfig) -> MaskRate:
    """A phase's training mask rate: ``mask_rate`` at its start, ``final_mask_rate`` at its end."""
    end = p.mask_rate if p.final_mask_rate is None else p.final_mask_rate
    return MaskRate(p.mask_rate, end, p.tokens)

