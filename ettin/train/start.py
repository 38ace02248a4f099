"""Where a run starts: its latest checkpoint (resume), other weights (``init``: ours, Hugging Face or
Composer), or scratch; and, after a phase ends, the next phase (one implementation for both)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from ettin.store.checkpoints import META
from ettin.store.rundir import RunDir
from ettin.train.checkpoint import Checkpointer, StartState
from ettin.train.config import ConfigError, TrainConfig, to_yaml

log = logging.getLogger("ettin")


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
    check_same_run(cfg, Path(path))
    start = checkpointer(cfg).resume(path, phases)
    begins = start.loader_state is None and start.phase_index < len(phases)
    if begins and cfg.phases[phases[start.phase_index]].reset_optimizer:
        return replace(start, optimizer_state=None, fresh_optimizer=True,
                       description=start.description + " (reset_optimizer: fresh Adam moments)")
    return start


# What a checkpoint's model is, besides its size and tokenizer: the fields of its resolved ModelConfig
# except those that change how it runs (attention backend, dropout), those the tokenizer sets and
# those a phase sets (RoPE, direction).
NOT_IDENTITY = ("attn_implementation", "embedding_dropout", "attention_dropout", "attention_output_dropout",
                "mlp_dropout", "vocab_size", "pad_token_id", "bos_token_id", "eos_token_id",
                "mask_token_id", "global_rope_theta", "local_rope_theta", "causal", "max_position_embeddings")
# The settings of the schedule: another value on resume is allowed (and listed as a warning).
SCHEDULE_KEYS = ("optim", "global_batch", "seed")


def check_same_run(cfg: TrainConfig, path: Path) -> None:
    """Before any weights are loaded: the checkpoint ``path`` was trained as the model this config
    describes (size, model fields, tokenizer, the objective of its phase), else a ConfigError naming
    each difference (checkpoint vs now); a changed schedule (optim, global batch, seed, the phase's
    settings) is logged as a warning listing the values."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    meta = Checkpointer.start_meta(path)
    if not (path / "config.yaml").is_file():
        return  # a merge's checkpoint (ettin.merge) or one of an older ettin: nothing to compare
    before = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False)
    now = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)), resolve=False)
    phase = meta["phase"]
    differences = _differences(before, now, ("size", "tokenizer"))
    if phase in cfg.phases and not differences and isinstance(meta.get("model_config"), dict):
        model = asdict(cfg.model_config(phase))
        differences += _differences({k: v for k, v in meta["model_config"].items() if k not in NOT_IDENTITY},
                                    {k: v for k, v in model.items() if k not in NOT_IDENTITY}, None,
                                    prefix="model.")
    if phase in cfg.phases and meta.get("objective_mix") not in (None, cfg.phase_mix(phase).name):
        differences.append(f"objective of phase {phase}: {meta['objective_mix']} in the checkpoint, "
                           f"{cfg.phase_mix(phase).name} now")
    if differences:
        raise ConfigError(
            f"{path} was trained as another model than this run describes: {'; '.join(differences)}. "
            f"Use another run_name (or output_dir) for the new model, or init={path} to start a new "
            "run from these weights; to continue this run, give the values it was trained with.")
    schedule = _differences(before.get("phases", {}).get(phase, {}), now.get("phases", {}).get(phase, {}),
                            None, prefix=f"phases.{phase}.") + _differences(before, now, SCHEDULE_KEYS)
    if schedule:
        log.warning("resuming %s with a changed schedule: %s", path, "; ".join(schedule))


def _differences(before: dict, now: dict, keys, prefix: str = "") -> list[str]:
    """``key: X in the checkpoint, Y now`` for each leaf of ``keys`` (None: all) that differs."""
    found = []
    for key in sorted(set(before) | set(now)) if keys is None else keys:
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) or isinstance(new, dict):
            found += _differences(old or {}, new or {}, None, prefix=f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {old} in the checkpoint, {new} now")
    return found


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
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        layers = [len({k.split(".")[2] for k in keys if k.startswith("model.layers.")})
                  for keys in (state, expected)]
        raise ConfigError(
            f"the starting weights ({source}) are another model: {layers[0]} layers in the weights, "
            f"{layers[1]} in the model"
            + (f"; only in the weights: {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"
               if unexpected else "")
            + (f"; only in the model: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
               if missing else "")
            + ". Give the size (or model.num_hidden_layers) the weights were trained with.")
    model.load_state_dict(state)
