"""A whole run: its phases in order from wherever the run stands (one process per run directory),
and its exports; ``pair_configs`` makes the two runs of a pair."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Optional

from ettin.objectives import OBJECTIVES, default_objective
from ettin.optim.schedule import (PhaseSchedule, phase_batch_schedule, phase_lr_multiplier,
                                  schedule_table)
from ettin.store.fs import write_text
from ettin.store.rundir import RunDir, RunLock
from ettin.train.config import ConfigError, TrainConfig, to_yaml
from ettin.train.environment import (environment_summary, git_commit, is_rank_zero,
                                     quiet_lightning_banners, set_cpu_threads, setup_logging,
                                     trainer_devices)
from ettin.train.loggers import finish_wandb
from ettin.train.phase import resolve_tokenizer, run_phase
from ettin.train.plan import check_phases_data
from ettin.train.preemption import Stopped
from ettin.train.start import resolve_start, resume
from ettin.train.step import NonFiniteLossError
from ettin.train.topology import check_topology

log = logging.getLogger("ettin")
# Lightning's pytree helper warns on every fit with this torch: nothing a user can act on.
PYTREE_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def train(cfg: TrainConfig) -> Path:
    """Run the recipe's phases from wherever the run stands; returns the final checkpoint."""
    run_dir = RunDir(cfg.run_dir)
    lock = RunLock(run_dir.path).acquire() if is_rank_zero() else None
    setup_logging(run_dir.train_log)
    if lock is not None and lock.taken_over:
        log.warning("took over %s from a process that is gone: %s", lock.path, lock.taken_over)
    try:
        return _train(cfg)
    except Stopped as stop:
        stop.run_name, stop.checkpoint = cfg.run_name, run_dir.latest_checkpoint()
        raise
    except NonFiniteLossError as error:
        latest = run_dir.latest_checkpoint()
        raise NonFiniteLossError(
            f"{error} The last good checkpoint is {latest}: lower optim.lr (or check the data and the "
            "initial weights), then run the same command again to resume from it." if latest else
            f"{error} No checkpoint was written yet: lower optim.lr (or check the data and the "
            "initial weights) and start again.") from None
    finally:
        finish_wandb()
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig) -> Path:
    run_dir = RunDir(cfg.run_dir)
    log.info("ettin run %s (recipe %s), git commit %s", cfg.run_name, cfg.recipe, git_commit())
    accelerator, devices = trainer_devices(cfg.trainer.accelerator, cfg.trainer.devices)
    check_topology(devices * cfg.trainer.num_nodes, devices_per_node=devices,
                   num_nodes=cfg.trainer.num_nodes)  # prints one line per rank
    set_cpu_threads(accelerator, devices, cfg.trainer.cpu_threads)
    warnings.filterwarnings("ignore", message=PYTREE_WARNING)
    quiet_lightning_banners()
    log.info("environment: %s", json.dumps(environment_summary()))
    for line in decisive_lines(cfg, accelerator, devices):
        log.info("%s", line)
    try:
        tokenizer = resolve_tokenizer(cfg)
    except (FileNotFoundError, OSError, ValueError) as error:
        raise ConfigError(f"tokenizer={cfg.tokenizer}: {error}") from None
    phases = cfg.phases_to_run()
    sources = check_phases_data(cfg, tokenizer)
    if is_rank_zero():
        from ettin.train.plan import plan_phase
        from ettin.train.preflight import startup_warnings

        for phase in phases:
            plan = plan_phase(cfg, phase, tokenizer, sources[phase], fresh_optimizer=False)
            for warning in startup_warnings(plan):
                log.warning("%s", warning)
    # Last, as it loads weights and optimizer state: every cheaper check has passed by then.
    start = resolve_start(cfg)
    if is_rank_zero():
        write_text(run_dir.config, to_yaml(cfg))
        log.info("resolved config: %s", run_dir.config)
    log.info("schedule:\n%s", schedule_table(schedule_rows(
        cfg, fresh_optimizer_phase=start.phase_index if start.fresh_optimizer else None)))
    log.info("start: %s", start.description)
    final: Optional[Path] = None
    for index in range(start.phase_index, len(phases)):
        phase = phases[index]
        final = run_phase(cfg, phase, tokenizer, start, sources[phase])
        if cfg.export_at_phase_end and is_rank_zero():
            export_run(final, run_dir.export(phase))
        start = resume(cfg, final)  # the next phase, from this one's end
    if final is None:  # every phase was already finished
        final = run_dir.latest_checkpoint()
        log.info("run %s already finished (%s)", cfg.run_name, final)
    if cfg.export_at_end and is_rank_zero():
        export_run(final, run_dir.export())
    return final


def decisive_lines(cfg: TrainConfig, accelerator: str, devices: int) -> list[str]:
    """What the console shows of the configuration (the whole of it goes to config.yaml)."""
    from ettin.optim.schedule import format_tokens

    phases = ", ".join(f"{name} {format_tokens(cfg.phases[name].tokens)} tokens at "
                       f"{cfg.phases[name].seq_len} ({cfg.phase_mix(name).name})"
                       for name in cfg.phases_to_run())
    data = "; ".join(f"{name}: " + ", ".join(s.path for s in cfg.data[name]) for name in cfg.phases_to_run())
    start = f", init {cfg.init} ({cfg.init_mode})" if cfg.init else ""
    return [
        f"recipe {cfg.recipe}: size {cfg.size}, objective {cfg.objective}, tokenizer {cfg.tokenizer}{start}",
        f"phases: {phases}",
        f"data: {data}",
        f"devices: {devices} {accelerator} x {cfg.trainer.num_nodes} node(s), global batch "
        f"{cfg.global_batch} rows, attention {cfg.model.get('attn_implementation', 'sdpa')}",
    ]


def export_run(checkpoint: Path, out: Path) -> Optional[Path]:
    """The checkpoint as a Hugging Face folder; None, with the reason logged, when no transformers
    class computes what it was trained to (the run's checkpoints are its result)."""
    from ettin.model.export import ExportError, export_checkpoint, export_class
    from ettin.store.checkpoints import read_meta

    try:
        export_class(read_meta(checkpoint))
    except ExportError as refused:
        log.warning("not exported: %s", refused)
        return None
    export_checkpoint(checkpoint, out)
    log.info("exported %s -> %s", checkpoint, out)
    return out


def schedule_rows(cfg: TrainConfig, *, fresh_optimizer_phase: Optional[int] = None) -> list[PhaseSchedule]:
    """The phases' LR and batch schedules as run. The phase at index ``fresh_optimizer_phase`` (the
    one this start enters, when it enters it with fresh Adam moments) shows its fresh-optimizer
    warmup; that is not always the first phase (a resume mid-way through a later phase that began
    fresh); a phase with ``reset_optimizer`` shows its warmup too."""
    rows = []
    for index, name in enumerate(cfg.phases_to_run()):
        p = cfg.phases[name]
        rows.append(PhaseSchedule(
            name=name, tokens=p.tokens, seq_len=p.seq_len, global_rope_theta=p.global_rope_theta,
            local_rope_theta=p.local_rope_theta, lr=cfg.optim.lr * p.lr_scale,
            lr_multiplier=phase_lr_multiplier(
                p, fresh_optimizer=index == fresh_optimizer_phase or p.reset_optimizer),
            global_batch=phase_batch_schedule(p, cfg.global_batch),
        ))
    return rows


def pair_configs(cfg: TrainConfig) -> list[TrainConfig]:
    """The encoder and the decoder of a pair, on the same data and schedule: the recipe's objective
    for its own side, the registry's default objective for the other."""
    mine = OBJECTIVES[cfg.objective]
    sides = {mine.side: cfg.objective}
    for side in ("encoder", "decoder"):
        sides.setdefault(side, default_objective(side))
    return [replace(cfg, objective=sides[side], run_name=f"{cfg.run_name}-{side}", pair=False)
            for side in ("encoder", "decoder")]
