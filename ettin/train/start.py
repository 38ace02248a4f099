"""Where a run starts: its latest checkpoint (resume), other weights (``init``: ours, Hugging Face or
Composer), or scratch; and, after a phase ends, the next phase (one implementation for both)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ettin.store.checkpoints import META
from ettin.store.rundir import RunDir
from ettin.train.checkpoint import Checkpointer, StartState
from ettin.train.config import ConfigError, TrainConfig


def checkpointer(cfg: TrainConfig) -> Checkpointer:
    return Checkpointer(cfg.run_dir, keep_interval=cfg.keep_interval_checkpoints,
                        keep_last=cfg.keep_last_checkpoints)


def resolve_start(cfg: TrainConfig) -> StartState:
    if cfg.resume == "never":
        existing = RunDir(cfg.run_dir).holds_a_run()
        if existing:
            raise ConfigError(
                f"resume=never, but {cfg.run_dir} already holds a run ({existing}); choose another "
                "run_name (or output_dir), or resume=auto to continue it"
            )
    else:
        path = Path(cfg.resume) if cfg.resume != "auto" else checkpointer(cfg).latest()
        if path is not None:
            return resume(cfg, path)
    if cfg.init:
        return init_state(cfg)
    return StartState()


def resume(cfg: TrainConfig, path: Path) -> StartState:
    """Continue from the checkpoint ``path``: mid-phase, or the next phase from a phase end, whose
    ``reset_optimizer`` drops the carried Adam moments (the fresh-optimizer warmup then applies)."""
    phases = cfg.phases_to_run()
    start = checkpointer(cfg).resume(path, phases)
    begins = start.loader_state is None and start.phase_index < len(phases)
    if begins and cfg.phases[phases[start.phase_index]].reset_optimizer:
        return replace(start, optimizer_state=None, fresh_optimizer=True,
                       description=start.description + " (reset_optimizer: fresh Adam moments)")
    return start


def init_state(cfg: TrainConfig) -> StartState:
    """Weights (and optionally optimizer state) from ``init``: ours, Hugging Face or Composer."""
    source = cfg.init
    path = Path(source)
    optimizer_state = None
    if path.is_dir() and RunDir(path).checkpoints.is_dir():
        found = RunDir(path).latest_checkpoint()
        if found is None:
            raise ConfigError(f"init={source}: that run has no complete checkpoint yet")
        path = found
    if path.is_dir() and (path / META).exists():
        loaded = Checkpointer(path.parent.parent).load(path, rng=False)
        model_state = loaded.model_state
        if cfg.init_mode == "weights+optimizer":
            optimizer_state = loaded.optimizer_state
        kind = "ettin checkpoint"
    elif path.suffix == ".pt":
        from ettin.model.composer import load_composer

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
        from ettin.model.hub import load_hf

        model_state = load_hf(source, revision=cfg.init_revision).state_dict()
        kind = "Hugging Face model" + (f" at revision {cfg.init_revision}" if cfg.init_revision else "")
    return StartState(model_state=model_state, optimizer_state=optimizer_state,
                      fresh_optimizer=optimizer_state is None,
                      description=f"initialised from {kind} {source} ({cfg.init_mode})")


def load_model_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """``model.load_state_dict`` with an error that names the tensor, both shapes and the fix."""
    from ettin.model.hub import HubError, check_shapes

    try:
        check_shapes(model.state_dict(), state, f"the starting weights ({source})")
    except HubError as error:
        raise ConfigError(str(error)) from None
    model.load_state_dict(state)
