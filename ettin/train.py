"""python -m ettin.train recipe=NAME [hydra overrides]

Runs a recipe's phases in order inside ``<output_dir>/<run_name>/``, resuming from the run's latest
complete checkpoint when there is one (``resume=auto``). With no arguments it runs ``recipe=smoke``:
a tiny encoder and decoder on the built-in corpus, on CPU, exported as Hugging Face folders.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
import warnings
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch

from ettin.checkpoint import CheckpointError, Checkpointer, RunLock, RunLockedError, StartState
from ettin.config import ModelConfig
from ettin.launch import TopologyError, check_topology
from ettin.objectives import OBJECTIVES
from ettin.preemption import Preempted
from ettin.recipes import ConfigError, TrainConfig, available_recipes, compose, parse_argv, to_yaml
from ettin.runtime import git_commit
from ettin.schedule import phase_batch_schedule, phase_lr_multiplier
from ettin.step import NonFiniteLossError

log = logging.getLogger("ettin")
# Lightning's pytree helper warns on every fit with this torch: nothing a user can act on.
PYTREE_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"

USAGE = """usage: python -m ettin.train [recipe=NAME] [key=value ...]

  recipe=NAME      one of: {recipes} (default: smoke)
  dry_run=true     print the resolved config, parameter count, FLOPs/token and the schedule; exit
  phase=NAME       run one phase alone (e.g. phase=extension init=PATH)
  init=PATH|ID     start from our checkpoint or run dir, a Hugging Face folder or hub id, or a
                   Composer .pt (init_mode=weights|weights+optimizer)
  init_revision=R  a hub revision of init (e.g. step599525, ext1000, decay100)
  resume=auto      (default) continue from the run's latest complete checkpoint; resume=never
                   refuses a run directory that already holds a run; resume=PATH one checkpoint
Any other key of the resolved config can be overridden the Hydra way (e.g. trainer.devices=2).
"""


# ---------------------------------------------------------------------------------------------------
# Start-up


def environment_summary() -> dict[str, Any]:
    import lightning
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "devices_visible": torch.cuda.device_count(),
        "host": platform.node(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def is_rank_zero() -> bool:
    """Whether this process is the job's first (SLURM's or torchrun's RANK, or the process Lightning
    started the others from: they get LOCAL_RANK / NODE_RANK)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def setup_logging(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
    if is_rank_zero():
        formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "train.log")):
            handler.setFormatter(formatter)
            log.addHandler(handler)
    log.propagate = False


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
        return ensure_builtin_tokenizer(directory)
    return load_tokenizer(cfg.tokenizer)


def resolve_sources(cfg: TrainConfig, phase: str, tokenizer) -> list:
    """The phase's sources; ``builtin`` prepares the built-in corpus if needed."""
    from ettin.data.corpus import builtin_data_path
    from ettin.data.loader import check_sources
    from ettin.data.prepare import ensure_prepared

    seq_len = cfg.phases[phase].seq_len
    sources = []
    for source in cfg.data[phase]:
        path = source.path
        if path == "builtin":
            path = str(builtin_data_path(cfg.data_dir, seq_len))
            ensure_prepared(
                input="builtin", output=path, tokenizer=tokenizer, max_seq_len=seq_len,
                wait=not is_rank_zero(),
            )
        sources.append(replace(source, path=path))
    # The loader's own checks, at start: a clear error before any process is spawned.
    try:
        _, devices = trainer_devices(cfg)
        check_sources(sources, seq_len, tokenizer, phase_tokens=cfg.phases[phase].tokens,
                      world_size=devices * cfg.trainer.num_nodes)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise ConfigError(f"data of phase {phase}: {error}") from None
    return sources


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


# ---------------------------------------------------------------------------------------------------
# Where a run starts: resume, init, or scratch


def checkpointer(cfg: TrainConfig) -> Checkpointer:
    return Checkpointer(cfg.run_dir, keep_interval=cfg.keep_interval_checkpoints,
                        keep_last=cfg.keep_last_checkpoints)


def resolve_start(cfg: TrainConfig) -> StartState:
    phases = cfg.phases_to_run()
    if cfg.resume == "never":
        existing = checkpointer(cfg).list() or list((cfg.run_dir / "logs").glob("*/metrics.csv"))
        if existing:
            raise ConfigError(
                f"resume=never, but {cfg.run_dir} already holds a run ({existing[-1]}); choose another "
                "run_name (or output_dir), or resume=auto to continue it"
            )
    else:
        path = Path(cfg.resume) if cfg.resume != "auto" else checkpointer(cfg).latest()
        if path is not None:
            return checkpointer(cfg).resume(path, phases)
    if cfg.init:
        return init_state(cfg)
    return StartState()


def init_state(cfg: TrainConfig) -> StartState:
    """Weights (and optionally optimizer state) from ``init``: ours, Hugging Face or Composer."""
    source = cfg.init
    path = Path(source)
    optimizer_state = None
    if path.is_dir() and (path / "checkpoints").is_dir():
        found = Checkpointer(path).latest()
        if found is None:
            raise ConfigError(f"init={source}: that run has no complete checkpoint yet")
        path = found
    if path.is_dir() and (path / "meta.json").exists():
        loaded = Checkpointer(path.parent.parent).load(path, rng=False)
        model_state = loaded.model_state
        if cfg.init_mode == "weights+optimizer":
            optimizer_state = loaded.optimizer_state
        kind = "ettin checkpoint"
    elif path.suffix == ".pt":
        from ettin.composer import load_composer

        _, model_state, optimizer_state, composer_meta = load_composer(path)
        if cfg.init_mode == "weights":
            optimizer_state = None
        elif optimizer_state is None:
            why = "; ".join(n for n in composer_meta["notes"] if n.startswith("optimizer"))
            raise ConfigError(f"init={source} holds no usable optimizer state ({why or 'none saved'}); "
                              "use init_mode=weights")
        kind = "Composer checkpoint"
    else:
        if not path.exists() and source.startswith(("/", ".", "runs")):
            raise ConfigError(
                f"init={source} does not exist; give a run dir, a checkpoint dir, a Hugging Face "
                "folder or hub id, or a Composer .pt"
            )
        if cfg.init_mode != "weights":
            raise ConfigError(f"init={source} is a Hugging Face model: only init_mode=weights")
        from ettin.hub import load_hf

        model_state = load_hf(source, revision=cfg.init_revision).state_dict()
        kind = "Hugging Face model" + (f" at revision {cfg.init_revision}" if cfg.init_revision else "")
    return StartState(model_state=model_state, optimizer_state=optimizer_state,
                      fresh_optimizer=optimizer_state is None,
                      description=f"initialised from {kind} {source} ({cfg.init_mode})")


# ---------------------------------------------------------------------------------------------------
# One phase


def trainer_devices(cfg: TrainConfig) -> tuple[str, int]:
    accelerator = cfg.trainer.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    devices = cfg.trainer.devices
    if devices in ("auto", -1):
        devices = torch.cuda.device_count() if accelerator == "gpu" else 1
    return accelerator, int(devices)


def set_cpu_threads(cfg: TrainConfig) -> None:
    """On CPU, each process of a run gets its share of the cores (torch's default takes them all in
    every process, and oversubscribed OpenMP threads slow everything on the machine 10x or more)."""
    accelerator, devices = trainer_devices(cfg)
    if accelerator == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // max(devices, 1)))


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # a data-loader worker collates on the host; it must not compete


def build_trainer(cfg: TrainConfig, phase: str, callbacks: list, loggers: list):
    import lightning as L

    from ettin.distributed import StepSyncDDPStrategy, cluster_plugins

    accelerator, devices = trainer_devices(cfg)
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


def build_loggers(cfg: TrainConfig, phase: str, resume_step: int) -> list:
    from lightning.pytorch.loggers import WandbLogger

    from ettin.runtime import MetricsCSV

    objective = OBJECTIVES[cfg.objective]
    loggers: list = []
    if cfg.logging.csv:
        columns = [*objective.metric_names("train"), "train/lr", "train/grad_norm", "train/tokens",
                   "train/global_batch", "perf/tokens_per_s_per_device", "perf/tflops_per_device",
                   "perf/mfu", *objective.metric_names("val"), "val/tokens"]
        loggers.append(MetricsCSV(cfg.run_dir / "logs" / phase / "metrics.csv", columns,
                                  resume_step=resume_step))
    if cfg.logging.wandb:
        mode = cfg.logging.wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        # One wandb run per ettin run: the id is the run name, so a requeued job continues it.
        loggers.append(WandbLogger(project=cfg.logging.wandb_project, name=cfg.run_name,
                                   id=cfg.run_name, resume="allow", save_dir=str(cfg.run_dir),
                                   offline=mode == "offline"))
    return loggers


def data_identity(cfg: TrainConfig, phase: str, sources: list) -> dict:
    """What decides the tokens a phase sees, in order: recorded in every checkpoint so two runs can be
    proven to have seen the same data (ettin.compare)."""
    from ettin.data.loader import prepared_fingerprint

    p = cfg.phases[phase]
    return {
        "seed": cfg.seed, "phase": phase, "seq_len": p.seq_len, "global_batch": cfg.global_batch,
        "batch_warmup_tokens": p.batch_warmup_tokens, "batch_warmup_min": p.batch_warmup_min,
        "sources": [{"path": s.path if "://" in s.path else str(Path(s.path).resolve()),
                     "weight": s.weight, "format": s.format, "fingerprint": prepared_fingerprint(s.path)}
                    for s in sources],
    }


def run_phase(cfg: TrainConfig, phase: str, tokenizer, start: StartState, sources: list) -> Path:
    """Train one phase from ``start`` on its checked ``sources``; returns the phase-end checkpoint."""
    import lightning as L
    from torch.utils.data import DataLoader

    from ettin.data.loader import LoaderState, StepBatches, validation_batches
    from ettin.flops import peak_flops_per_device
    from ettin.model import ModernBert
    from ettin.module import EttinModule, count_on_host
    from ettin.preemption import PreemptionHandler
    from ettin.runtime import CheckpointCallback, TokenProgressBar, ValidationCallback, restore_rng
    from ettin.speedups import apply_speedups

    p = cfg.phases[phase]
    objective = OBJECTIVES[cfg.objective]
    model_config = run_model_config(cfg, phase, tokenizer)
    torch.manual_seed(cfg.seed)  # the initial weights are a function of the seed alone
    accelerator, _ = trainer_devices(cfg)
    loss = cfg.trainer.loss_implementation
    model = ModernBert(model_config, loss_implementation=loss if loss != "auto" else
                       ("chunked" if accelerator == "gpu" else "plain"))
    if start.model_state is not None:
        load_model_state(model, start.model_state, start.description)
    apply_speedups(model, compile=cfg.trainer.compile,
                   activation_checkpointing=cfg.trainer.activation_checkpointing)
    loader_state = LoaderState(**start.loader_state) if start.loader_state else \
        LoaderState(step=0, samples=0, tokens=0)

    def start_rng(module: EttinModule) -> None:
        rank, world = module.global_rank, module.trainer.world_size
        if start.rng_states is not None:
            restore_rng(start.rng_states, rank, world, seed=cfg.seed + loader_state.step)
        else:
            torch.manual_seed(cfg.seed * 1000 + rank)

    module = EttinModule(
        model, objective=objective, lr=cfg.optim.lr * p.lr_scale, peak_lr=cfg.optim.lr,
        lr_multiplier=phase_lr_multiplier(p, fresh_optimizer=start.fresh_optimizer),
        phase_tokens=p.tokens, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps, loss_normalization=cfg.optim.loss_normalization,
        peak_flops=peak_flops_per_device() if accelerator == "gpu" else None,
        optimizer_state=start.optimizer_state, log_every_steps=cfg.trainer.log_every_steps,
        loader_state=loader_state, on_train_start_fn=start_rng,
    )

    class PhaseData(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            steps = StepBatches(
                sources, split="train", seq_len=p.seq_len,
                collator=objective.collator(tokenizer, mask_rate=p.mask_rate, seed=cfg.seed),
                global_batch_at=phase_batch_schedule(p, cfg.global_batch),
                micro_batch_size=p.micro_batch,
                rank=self.trainer.global_rank, world_size=self.trainer.world_size, seed=cfg.seed,
                phase=phase, state=loader_state, pack=cfg.packs_micro_batches(),
            )
            # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG,
            # which would shift the dropout stream restored from a checkpoint.
            return DataLoader(steps, batch_size=None, num_workers=cfg.trainer.num_workers,
                              pin_memory=accelerator == "gpu", persistent_workers=False,
                              worker_init_fn=_one_thread,
                              generator=torch.Generator().manual_seed(cfg.seed))

        def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
            return count_on_host(batch)

    def val_batches(module: EttinModule):
        collator = objective.collator(tokenizer, mask_rate=cfg.trainer.val_mask_rate, seed=cfg.seed)
        return validation_batches(sources, seq_len=p.seq_len, collator=collator,
                                  batch_size=p.micro_batch, max_samples=cfg.trainer.val_samples,
                                  rank=module.global_rank, world_size=module.trainer.world_size)

    checkpoints = CheckpointCallback(
        cfg, phase, tokenizer, checkpointer(cfg), every_tokens=p.checkpoint_every_tokens,
        start_tokens=loader_state.tokens, fresh_optimizer=start.fresh_optimizer,
        data_identity=data_identity(cfg, phase, sources))
    validation = ValidationCallback(val_batches, every_tokens=p.val_every_tokens,
                                    start_tokens=loader_state.tokens)
    preemption = PreemptionHandler(
        save_fn=lambda trainer: checkpoints.save(trainer.lightning_module, kind="preemption"),
        timeout=timedelta(seconds=cfg.trainer.process_group_timeout_s))
    progress = TokenProgressBar(phase, p.tokens, loader_state.tokens)
    trainer = build_trainer(cfg, phase, callbacks=[validation, checkpoints, preemption, progress],
                            loggers=build_loggers(cfg, phase, resume_step=loader_state.step))
    log.info("phase %s: %s", phase, start.description)
    log.info("model: %s, %s parameters, attention backend %s, %s; %s",
             cfg.size, f"{model.num_parameters():,}", model_config.attn_implementation,
             "causal" if model_config.causal else "bidirectional", micro_batches_described(cfg, phase))
    trainer.fit(module, datamodule=PhaseData())
    if preemption.preempted:
        raise Preempted(f"preempted in phase {phase}; the checkpoint is saved and the job requeued")
    if module.loader_state.tokens < p.tokens:
        raise RuntimeError(
            f"phase {phase} stopped at {module.loader_state.tokens:,} of {p.tokens:,} tokens "
            "(interrupted); run the same command again to resume"
        )
    validation.validate(module)
    return checkpoints.save(module, kind="phase_end")


def load_model_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """``model.load_state_dict`` with an error that names the tensor, both shapes and the fix."""
    from ettin.hub import HubError, check_shapes

    try:
        check_shapes(model.state_dict(), state, f"the starting weights ({source})")
    except HubError as error:
        raise ConfigError(str(error)) from None
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# A whole run


def check_phases_data(cfg: TrainConfig, tokenizer) -> dict[str, list[tuple[str, float]]]:
    """Every phase's data, checked before the first step (a missing extension folder must not wait
    for the end of pretraining to fail)."""
    return {phase: resolve_sources(cfg, phase, tokenizer) for phase in cfg.phases_to_run()}


def train(cfg: TrainConfig) -> Path:
    """Run the recipe's phases from wherever the run stands; returns the final checkpoint."""
    lock = RunLock(cfg.run_dir).acquire() if is_rank_zero() else None
    setup_logging(cfg.run_dir)
    if lock is not None and lock.taken_over:
        log.warning("took over %s from a process that is gone: %s", lock.path, lock.taken_over)
    try:
        return _train(cfg)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig) -> Path:
    from ettin.schedule import schedule_table

    log.info("ettin run %s (recipe %s), git commit %s", cfg.run_name, cfg.recipe, git_commit())
    _, devices = trainer_devices(cfg)
    check_topology(devices * cfg.trainer.num_nodes, devices_per_node=devices,
                   num_nodes=cfg.trainer.num_nodes)  # prints one line per rank
    set_cpu_threads(cfg)
    warnings.filterwarnings("ignore", message=PYTREE_WARNING)
    log.info("environment: %s", json.dumps(environment_summary()))
    log.info("resolved config:\n%s", to_yaml(cfg))
    try:
        tokenizer = resolve_tokenizer(cfg)
    except (FileNotFoundError, OSError, ValueError) as error:
        raise ConfigError(f"tokenizer={cfg.tokenizer}: {error}") from None
    phases = cfg.phases_to_run()
    sources = check_phases_data(cfg, tokenizer)
    # Last, as it loads weights and optimizer state: every cheaper check has passed by then.
    start = resolve_start(cfg)
    if is_rank_zero():
        (cfg.run_dir / "config.yaml").write_text(to_yaml(cfg))
    log.info("schedule:\n%s", schedule_table(schedule_rows(cfg)))
    log.info("start: %s", start.description)
    final: Optional[Path] = None
    for index in range(start.phase_index, len(phases)):
        phase = phases[index]
        final = run_phase(cfg, phase, tokenizer, start, sources[phase])
        quiet_lightning_banners()
        if cfg.export_at_phase_end and is_rank_zero():
            export_run(cfg, final, cfg.run_dir / f"hf-{phase}")
        loaded = checkpointer(cfg).load(final, rng=False)
        start = StartState(
            model_state=loaded.model_state, optimizer_state=loaded.optimizer_state,
            fresh_optimizer=False, description=f"continued from the end of phase {phase!r} ({final})",
        )
    if final is None:  # every phase was already finished
        final = checkpointer(cfg).latest()
        log.info("run %s already finished (%s)", cfg.run_name, final)
    if cfg.export_at_end and is_rank_zero():
        export_run(cfg, final, export_dir(cfg))
    return final


def quiet_lightning_banners() -> None:
    """Lightning prints its device banner for every Trainer: once per run is enough."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)


def export_dir(cfg: TrainConfig) -> Path:
    return cfg.run_dir / "hf"


def export_run(cfg: TrainConfig, checkpoint: Path, out: Path) -> Path:
    from ettin.export import export_checkpoint

    export_checkpoint(checkpoint, out)
    log.info("exported %s -> %s", checkpoint, out)
    return out


def schedule_rows(cfg: TrainConfig) -> list:
    from ettin.schedule import PhaseSchedule

    return [
        PhaseSchedule(
            name=name, tokens=cfg.phases[name].tokens, seq_len=cfg.phases[name].seq_len,
            global_rope_theta=cfg.phases[name].global_rope_theta,
            local_rope_theta=cfg.phases[name].local_rope_theta,
            lr=cfg.optim.lr * cfg.phases[name].lr_scale, lr_multiplier=phase_lr_multiplier(cfg.phases[name]),
            global_batch=phase_batch_schedule(cfg.phases[name], cfg.global_batch),
        )
        for name in cfg.phases_to_run()
    ]


def pair_configs(cfg: TrainConfig) -> list[TrainConfig]:
    """The encoder and the decoder of a pair, on the same data and schedule."""
    encoder_objective = "mlm" if OBJECTIVES[cfg.objective].causal else cfg.objective
    return [
        replace(cfg, objective=encoder_objective, run_name=f"{cfg.run_name}-encoder", pair=False),
        replace(cfg, objective="clm", run_name=f"{cfg.run_name}-decoder", pair=False),
    ]


def pair_report(cfg: TrainConfig, runs: list[TrainConfig]) -> Path:
    """Both exports evaluated on the same tasks, and the pair report with its plots."""
    from ettin.compare import write_report
    from ettin.evaluation import evaluate

    out = Path(cfg.output_dir) / f"{cfg.run_name}-report"
    log.info("evaluating %s on the offline suite", " and ".join(r.run_name for r in runs))
    results = evaluate([r.run_dir for r in runs], tasks=cfg.eval_tasks, out=out, seed=cfg.seed)
    return write_report(runs[0].run_dir, runs[1].run_dir, out, evaluation=results)


def micro_batches_described(cfg: TrainConfig, phase: str) -> str:
    p = cfg.phases[phase]
    if cfg.packs_micro_batches():
        return f"packed micro-batches of up to {p.micro_batch * p.seq_len:,} tokens"
    return f"micro-batches of {p.micro_batch} rows"


def dry_run_report(cfg: TrainConfig) -> str:
    from ettin.flops import training_flops
    from ettin.model import ModernBert
    from ettin.schedule import schedule_table, steps_for

    objective = OBJECTIVES[cfg.objective]
    lines = [f"recipe {cfg.recipe} (run {cfg.run_name}, objective {cfg.objective})", "", to_yaml(cfg)]
    for name in cfg.phases_to_run():
        p = cfg.phases[name]
        config = cfg.model_config(name)
        with torch.device("meta"):
            model = ModernBert(config)
        n_targets = objective.targets_per_row(p.seq_len, p.mask_rate)
        flops = training_flops(config, [p.seq_len], n_targets, config.causal) / p.seq_len
        steps = steps_for(p.tokens, p.seq_len, phase_batch_schedule(p, cfg.global_batch))
        lines.append(
            f"phase {name}: {model.num_parameters():,} parameters, {flops / 1e9:.3f} GFLOP per "
            f"token (training, full {p.seq_len}-token rows), {p.tokens:,} tokens, >= {steps:,} "
            f"optimizer steps (rows at full length; shorter documents mean more steps); "
            + micro_batches_described(cfg, name)
        )
    lines += ["", schedule_table(schedule_rows(cfg)), "", *readiness(cfg)]
    return "\n".join(lines)


def readiness(cfg: TrainConfig) -> list[str]:
    """What a real run would need that is not there yet: the tokenizer and every phase's data."""
    from ettin.data.loader import open_splits, source_format
    from ettin.data.mds import looks_like_mds

    lines = ["ready to run?"]
    if cfg.tokenizer == "builtin":
        lines.append("  tokenizer: built-in (trained at start if missing)")
    else:
        from ettin.data.tokenizer import load_tokenizer

        try:
            load_tokenizer(cfg.tokenizer)
            lines.append(f"  tokenizer {cfg.tokenizer}: ok")
        except Exception as error:  # noqa: BLE001 - reported, not raised: this is a report
            lines.append(f"  tokenizer {cfg.tokenizer}: MISSING - {str(error).splitlines()[0]}")
    for phase in cfg.phases_to_run():
        for source in cfg.data[phase]:
            if source.path == "builtin":
                lines.append(f"  data {phase}: built-in corpus (prepared at start if missing)")
                continue
            kind = source_format(source)
            try:
                if kind == "prepared":
                    open_splits([source], "train", cfg.phases[phase].seq_len)
                elif kind == "mds" and not looks_like_mds(source.path):  # cheap: no index pass
                    raise FileNotFoundError(f"no MDS index in {source.path}")
                lines.append(f"  data {phase}: {source.path} ({kind}): ok")
            except (ValueError, FileNotFoundError, OSError) as error:
                lines.append(f"  data {phase}: {source.path}: MISSING - {str(error).splitlines()[0]}")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE.format(recipes=", ".join(available_recipes())))
        return 0
    recipe, overrides = parse_argv(argv)
    try:
        cfg = compose(recipe, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if cfg.dry_run:
        print(dry_run_report(cfg))
        return 0
    runs = pair_configs(cfg) if cfg.pair else [cfg]
    started = time.perf_counter()
    report = None
    try:
        finals = [(run, train(run)) for run in runs]
        if cfg.pair and cfg.eval_at_end and is_rank_zero():
            report = pair_report(cfg, runs)
    except Preempted as stop:
        log.info("%s", stop)
        return 0
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except (TopologyError, ConfigError, CheckpointError, RunLockedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if is_rank_zero():
        print(summary(finals, time.perf_counter() - started, report))
    return 0


def summary(finals: list[tuple[TrainConfig, Path]], seconds: float, report: Optional[Path] = None) -> str:
    from ettin.export import pipeline_example

    lines = [f"\nDone in {seconds / 60:.1f} min."]
    for cfg, checkpoint in finals:
        lines.append(f"  {cfg.run_name}: final checkpoint {checkpoint}")
        if cfg.export_at_end:
            out = export_dir(cfg)
            lines.append(f"    Hugging Face folder: {out}")
            lines.append(f"    try: {pipeline_example(out, OBJECTIVES[cfg.objective].causal)}")
    if report is not None:
        lines.append(f"  pair report: {report}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
