"""Typed training configuration and recipe composition.

A recipe (``recipes/<name>.yaml``) is a few lines: a size (a row of ``ettin.model.config.SIZES``, whose
values the configs read with ``${size:FIELD}``), an objective, a phase list (``conf/phases``) and
optionally an init. Composition is Hydra's; the result is merged into the ``TrainConfig`` schema
below, so an unknown key or a wrongly typed value fails at start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ettin import CONF_DIR, RECIPES_DIR
from ettin.model.config import SIZES, ModelConfig, model_config, size_value
from ettin.data.source import DataSource
from ettin.objectives import OBJECTIVES, Attention, MixError, Objective, ObjectiveMix, resolve_mix


LR_SCHEDULES = ("wsd", "one_minus_sqrt")
INIT_MODES = ("weights", "weights+optimizer")
STRATEGIES = ("ddp", "fsdp")
LOSS_NORMALIZATIONS = ("tokens", "micro_batch")
# Lightning's precisions ettin trains with; auto: bf16-mixed on GPU, 32-true on CPU.
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")

# ``${size:FIELD}`` in a config reads FIELD of the run's row of the size table (ettin/model/config.py).
if not OmegaConf.has_resolver("size"):
    OmegaConf.register_new_resolver("size", lambda field, _root_: size_value(_root_.size, field))


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the problem and the fix."""


@dataclass
class PhaseConfig:
    tokens: int = "???"  # type: ignore[assignment]  # non-pad tokens, summed over ranks
    seq_len: int = 1024
    lr_scale: float = 1.0  # the phase's peak/start LR = optim.lr * lr_scale
    lr_schedule: str = "wsd"  # wsd: warmup-stable-linear decay; one_minus_sqrt: 1-sqrt decay
    warmup_tokens: int = 0
    decay_tokens: int = 0  # wsd only: length of the final linear decay
    final_lr_ratio: float = 1.0  # LR at the end of the phase, relative to the phase's start LR
    batch_warmup_tokens: int = 0
    batch_warmup_min: int = 0  # first global batch of the ramp (sequences); also its step size
    global_rope_theta: float = 10000.0
    local_rope_theta: float = 10000.0
    # The phase's objective (a name in ettin.objectives.OBJECTIVES); None: the run's ``objective``.
    # Attention direction, collator, metrics, validation and the export class follow it.
    objective: Optional[str] = None
    # The phase's objective mix (GPT-BERT), objective name -> weight, e.g. {mlm: 15, clm: 1}: each row
    # trains one of them (docs/recipes.md). Empty: ``objective``, else the run's objective_mix/objective.
    objective_mix: dict[str, float] = field(default_factory=dict)
    # true: the phase starts with fresh Adam moments (and fresh_optimizer_warmup_tokens) instead of
    # the previous phase's, e.g. when the objective changes (Gisserot-Boukhlef et al. 2025).
    reset_optimizer: bool = False
    mask_rate: float = 0.3  # MLM/MNTP only: the rate at the phase's start
    # The rate at the phase's end, linear in the phase's tokens in between (mmBERT's annealing);
    # None: mask_rate throughout.
    final_mask_rate: Optional[float] = None
    micro_batch: int = 8  # sequences per device per forward/backward
    checkpoint_every_tokens: int = 0  # 0: only at the phase end
    # A phase that starts with a fresh optimizer (zero Adam moments: weights from a Hugging Face
    # folder or init_mode=weights) and has no warmup of its own ramps the LR up over these tokens.
    fresh_optimizer_warmup_tokens: int = 0
    val_every_tokens: int = 0  # validation cadence; 0: only at the phase end


@dataclass
class OptimConfig:
    lr: float = 8e-4  # peak LR of phase 1; other phases scale it with lr_scale
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    # tokens: the mean over every target token of an optimizer step, across micro-batches and ranks
    # (docs/recipes.md); micro_batch: Composer's mean per micro-batch, averaged (how Ettin was trained).
    loss_normalization: str = "tokens"


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    strategy: str = "ddp"  # ddp, or fsdp (FSDP2: weights, gradients and moments sharded; 400m, 1b)
    compile: bool = False
    activation_checkpointing: bool = False
    # plain: the vocabulary logits of all targets at once; chunked: a few thousand at a time, never
    # [targets x vocab] in memory (CLM at 8K). auto: chunked on GPU, plain on CPU.
    loss_implementation: str = "auto"
    num_workers: int = 2
    # Torch threads per process on CPU; None: the process's share of the cores. The smoke recipes
    # use 1 (the data loader's worker takes the other core of a 2-core machine).
    cpu_threads: Optional[int] = None
    log_every_steps: int = 10
    # Validation samples in all, not per device: the same samples whatever the micro-batch size or
    # the number of devices.
    val_samples: int = 512
    val_mask_rate: float = 0.15
    process_group_timeout_s: int = 600


@dataclass
class LoggingConfig:
    csv: bool = True
    wandb: bool = False
    wandb_project: str = "ettin"
    wandb_mode: str = "auto"  # auto: online when WANDB_API_KEY is set, else offline


@dataclass
class TrainConfig:
    recipe: str = "???"
    run_name: str = "???"
    output_dir: str = "runs"
    size: str = "???"
    objective: str = "???"
    # Every phase's objective mix unless the phase names its own objective or mix (docs/recipes.md,
    # objective mix); export_as (encoder | decoder) says which model a mix spanning both sides is.
    objective_mix: dict[str, float] = field(default_factory=dict)
    export_as: Optional[str] = None
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields over the size row
    tokenizer: str = "???"
    optim: OptimConfig = field(default_factory=OptimConfig)
    global_batch: int = 4608  # sequences per optimizer step, whatever the number of devices
    phases: dict[str, PhaseConfig] = field(default_factory=dict)
    # Sources per phase name: the same data for the encoder and the decoder of a pair.
    data: dict[str, list[DataSource]] = field(default_factory=dict)
    # false (Ettin): micro_batch rows (one chunk each) per micro-batch. true: each micro-batch takes
    # whole chunks up to micro_batch x seq_len tokens (short documents fill it; attention stays within
    # each chunk; the step's samples are the same). auto: see TrainConfig.packs_micro_batches.
    pack_micro_batches: Any = "auto"
    pair: bool = False  # train the encoder AND the decoder (run names <run_name>-encoder/-decoder)
    phase_order: list[str] = field(default_factory=list)
    phase: Optional[str] = None  # run only this phase
    init: Optional[str] = None  # our checkpoint or run dir, an HF folder or hub id, a Composer .pt
    init_mode: str = "weights"
    init_revision: Optional[str] = None  # a hub revision of init, e.g. step599525, ext1000, decay100
    resume: str = "auto"  # auto: latest complete checkpoint of the run if any; never; or a path
    seed: int = 21
    data_dir: str = "data"  # where the offline default prepares the built-in corpus
    # Every checkpoint_every_tokens checkpoint and every phase end is kept (Ettin released them all);
    # of the other saves (preemption), the newest keep_last_checkpoints.
    keep_interval_checkpoints: bool = True
    keep_last_checkpoints: int = 3
    # Evaluate what was trained: a pair's two exports, and the pair report; one run (pair=false) into RUN/eval/.
    eval_at_end: bool = False
    eval_tasks: str = "offline"  # the tasks of that evaluation (python -m ettin.eval --tasks)
    eval_limit: Optional[int] = None  # at most this many examples per task (quick looks, tests)
    export_at_phase_end: bool = False
    export_at_end: bool = False
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dry_run: bool = False
    # A few optimizer steps of every phase at its real shapes on this device: time, memory and the
    # whole recipe's projection (ettin/train/preflight.py); writes nothing.
    preflight: bool = False
    preflight_steps: int = 2

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def phases_to_run(self) -> list[str]:
        return [self.phase] if self.phase else list(self.phase_order)

    def packs_micro_batches(self) -> bool:
        """``pack_micro_batches=auto`` packs where packing is free: under ``tokens`` loss
        normalisation (the step's gradient then does not depend on how its samples are grouped)
        with a varlen attention backend (flex, flash: a micro-batch costs its tokens, whereas sdpa's
        [rows, max_seqlen] grid, and its memory, would grow with the rows a packed micro-batch holds)."""
        if self.pack_micro_batches != "auto":
            return bool(self.pack_micro_batches)
        attn = self.model.get("attn_implementation", ModelConfig.attn_implementation)
        return self.optim.loss_normalization == "tokens" and attn in ("flex", "flash")

    def micro_batches_described(self, phase: str) -> str:
        p = self.phases[phase]
        if self.packs_micro_batches():
            return f"packed micro-batches of up to {p.micro_batch * p.seq_len:,} tokens"
        return f"micro-batches of {p.micro_batch} rows"

    def phase_mix(self, phase: str) -> ObjectiveMix:
        """What ``phase`` trains: its own mix or objective, else the run's mix or objective."""
        p = self.phases[phase]
        return resolve_mix(p.objective_mix, p.objective, self.objective_mix, self.objective, self.export_as)

    def phase_objective(self, phase: str) -> Objective:
        """The objective ``phase``'s model is (its direction, its export): the phase's objective, or
        its mix's (``ObjectiveMix.objective``)."""
        return self.phase_mix(phase).objective

    def model_config(self, phase: str) -> ModelConfig:
        p = self.phases[phase]
        return model_config(
            self.size,
            causal=self.phase_objective(phase).causal,
            global_rope_theta=p.global_rope_theta,
            local_rope_theta=p.local_rope_theta,
            **self.model,
        )


def parse_argv(argv: list[str]) -> tuple[str, list[str]]:
    """``recipe=NAME`` (default: smoke) and the Hydra overrides of a command line."""
    recipe, overrides = "smoke", []
    for arg in argv:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    return recipe, overrides


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def compose(recipe: str, overrides: list[str] = ()) -> TrainConfig:
    """Compose ``recipes/<recipe>.yaml`` with Hydra overrides into a validated TrainConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    from hydra.core.config_store import ConfigStore

    # The schema is the first default of conf/base.yaml, so overrides of any schema key work.
    ConfigStore.instance().store(name="ettin_schema", node=TrainConfig)
    choices = available_recipes()
    if recipe not in choices:
        raise ConfigError(f"unknown recipe {recipe!r}; available recipes: {', '.join(choices)}")
    # `model` holds ModelConfig fields over the size row (any field, checked by model_config), an
    # objective mix any objective names: set them as plain overrides, which Hydra only accepts for
    # keys the recipe already has.
    overrides = [f"++{o}" if o.startswith("model.") or o.split("=", 1)[0].endswith("objective_mix")
                 else o for o in overrides]
    try:
        with initialize_config_dir(str(RECIPES_DIR), version_base=None):
            raw = hydra_compose(
                recipe, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *overrides]
            )
    except HydraException as error:
        raise ConfigError(f"recipe {recipe!r} with overrides {list(overrides)}: {error}") from None
    raw = OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"]) if "hydra" in raw else raw
    return validate(raw, recipe)


def validate(raw: DictConfig | dict, recipe: str = "") -> TrainConfig:
    """Merge into the schema (unknown keys and bad types fail) and check the combinations."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        # As plain values, so a key added with Hydra's `+key=value` meets the schema too and fails.
        if isinstance(raw, DictConfig):
            raw = OmegaConf.to_container(raw, resolve=False)
        merged = OmegaConf.merge(schema, raw)
        if recipe and OmegaConf.is_missing(merged, "recipe"):
            merged.recipe = recipe
        if OmegaConf.is_missing(merged, "run_name"):
            merged.run_name = merged.recipe
        cfg: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
        # Lists inside dicts come back as plain dicts; make every source a DataSource.
        cfg.data = {
            phase: [s if isinstance(s, DataSource) else DataSource(**s) for s in sources]
            for phase, sources in cfg.data.items()
        }
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid configuration: {error}".strip()) from None
    check(cfg)
    return cfg


def check(cfg: TrainConfig) -> None:
    if cfg.size not in SIZES:
        raise ConfigError(f"size={cfg.size!r} is unknown; choose one of {', '.join(SIZES)}")
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(
            f"objective={cfg.objective!r} is unknown; choose one of {', '.join(OBJECTIVES)}"
        )
    if cfg.init_mode not in INIT_MODES:
        raise ConfigError(f"init_mode={cfg.init_mode!r}; choose one of {', '.join(INIT_MODES)}")
    if cfg.optim.loss_normalization not in LOSS_NORMALIZATIONS:
        raise ConfigError(f"optim.loss_normalization={cfg.optim.loss_normalization!r}; choose one of "
                          f"{', '.join(LOSS_NORMALIZATIONS)}")
    if cfg.pack_micro_batches not in ("auto", True, False):
        raise ConfigError(f"pack_micro_batches={cfg.pack_micro_batches!r}; choose auto, true or false")
    if cfg.pack_micro_batches is True and cfg.optim.loss_normalization == "micro_batch":
        raise ConfigError("pack_micro_batches=true with optim.loss_normalization=micro_batch: each "
                          "micro-batch's mean would weigh differently from Composer's, so the run "
                          "would reproduce neither; use loss_normalization=tokens to pack, or "
                          "pack_micro_batches=false to reproduce Ettin")
    if cfg.trainer.loss_implementation not in ("auto", "plain", "chunked"):
        raise ConfigError(f"trainer.loss_implementation={cfg.trainer.loss_implementation!r}; choose one "
                          "of auto, plain, chunked")
    if cfg.trainer.val_samples < 1:
        raise ConfigError("trainer.val_samples must be >= 1")
    if cfg.trainer.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={cfg.trainer.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if cfg.init_revision and not cfg.init:
        raise ConfigError(f"init_revision={cfg.init_revision} without init: give init=<hub id> too")
    if not cfg.phase_order:
        raise ConfigError("the recipe lists no phases (phase_order is empty)")
    for name in cfg.phase_order:
        if name not in cfg.phases:
            raise ConfigError(
                f"phase_order names {name!r} but phases defines only {', '.join(cfg.phases)}"
            )
    if cfg.phase is not None and cfg.phase not in cfg.phase_order:
        raise ConfigError(
            f"phase={cfg.phase!r} is not a phase of this recipe; choose one of "
            f"{', '.join(cfg.phase_order)}"
        )
    if cfg.export_as is not None and cfg.export_as not in ("encoder", "decoder"):
        raise ConfigError(f"export_as={cfg.export_as!r}; choose encoder or decoder")
    if cfg.export_as is not None and cfg.pair:
        raise ConfigError(f"export_as={cfg.export_as} names the model of a single run, but pair=true "
                          "trains and exports both an encoder and a decoder: set pair=false or "
                          "remove export_as")
    if cfg.pair and OBJECTIVES[cfg.objective].side is None:
        raise ConfigError(f"objective={cfg.objective} is neither an encoder's nor a decoder's objective, "
                          "so it has no pair: set pair=false")
    if cfg.objective_mix and cfg.pair:
        raise ConfigError("objective_mix trains one model on both objectives, not a pair: set "
                          "pair=false (and export_as=encoder|decoder for the model it is)")
    check_option_values(cfg)
    for name in cfg.phases_to_run():
        p = cfg.phases[name]
        if p.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"phases.{name}.lr_schedule={p.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
            )
        if p.tokens <= 0 or p.seq_len <= 1 or p.micro_batch <= 0:
            raise ConfigError(f"phases.{name}: tokens, seq_len and micro_batch must be positive")
        if p.warmup_tokens + p.decay_tokens > p.tokens:
            raise ConfigError(
                f"phases.{name}: warmup_tokens + decay_tokens ({p.warmup_tokens + p.decay_tokens}) "
                f"exceed the phase's tokens ({p.tokens})"
            )
        if p.objective is not None and p.objective not in OBJECTIVES:
            raise ConfigError(f"phases.{name}.objective={p.objective!r} is unknown; choose one of "
                              f"{', '.join(OBJECTIVES)} (or leave it unset for the run's objective)")
        check_mix(cfg, name)
        if any(m.masked for m in cfg.phase_mix(name).members):
            for key, rate in (("mask_rate", p.mask_rate), ("final_mask_rate", p.final_mask_rate)):
                if rate is not None and not 0.0 < rate < 1.0:
                    raise ConfigError(f"phases.{name}.{key}={rate} must be in (0, 1)")
        if not cfg.data.get(name):
            raise ConfigError(
                f"no data for phase {name!r}: set data.{name}=[{{path: PREPARED_DIR, weight: 1}}] "
                "(prepare one with: python -m ettin.data.prepare input=PATH output=DIR "
                f"tokenizer={cfg.tokenizer} max_seq_len={p.seq_len})"
            )
        check_batch_schedule(cfg, name)
    try:
        cfg.model_config(cfg.phases_to_run()[0])
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"model: {error}") from None


def check_option_values(cfg: TrainConfig) -> None:
    """Values that would otherwise fail only after training started (or after both models of a pair
    trained): each names the key and what it may be."""
    if cfg.trainer.log_every_steps < 1:
        raise ConfigError(f"trainer.log_every_steps={cfg.trainer.log_every_steps}: must be an integer "
                          ">= 1 (log every that many optimizer steps)")
    # The newest checkpoint is never deleted, so at least one is always kept: 0 cannot be honoured.
    if cfg.keep_last_checkpoints < 1:
        raise ConfigError(f"keep_last_checkpoints={cfg.keep_last_checkpoints}: must be >= 1 (the newest "
                          "checkpoint is always kept; interval and phase-end checkpoints follow "
                          "keep_interval_checkpoints)")
    if cfg.global_batch < 1:
        raise ConfigError(f"global_batch={cfg.global_batch}: must be >= 1 (sequences per optimizer step)")
    if not 0.0 < cfg.trainer.val_mask_rate < 1.0:
        raise ConfigError(f"trainer.val_mask_rate={cfg.trainer.val_mask_rate}: must be in (0, 1)")
    if cfg.trainer.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r}; choose one of "
                          f"{', '.join(PRECISIONS)}")
    if cfg.eval_at_end:  # evaluated only then: checked only then (it may index lm-eval)
        from ettin.evaluation.models import EvalError
        from ettin.evaluation.registry import resolve_tasks

        try:
            resolve_tasks(cfg.eval_tasks)
        except EvalError as error:
            raise ConfigError(f"eval_tasks={cfg.eval_tasks}: {error}") from None


def check_batch_schedule(cfg: TrainConfig, phase: str) -> None:
    """The phase's global batch and its warmup ramp (``batch_warmup_tokens=0``: no ramp, and then
    ``batch_warmup_min`` is not read)."""
    p = cfg.phases[phase]  # global_batch >= 1: check_option_values, which runs first
    if p.batch_warmup_tokens < 0:
        raise ConfigError(f"phases.{phase}.batch_warmup_tokens={p.batch_warmup_tokens} must be >= 0 "
                          "(0: no batch warmup)")
    if p.batch_warmup_tokens and not 0 < p.batch_warmup_min <= cfg.global_batch:
        raise ConfigError(
            f"phases.{phase}.batch_warmup_min={p.batch_warmup_min} (where the batch warmup starts) must "
            f"be in (0, global_batch={cfg.global_batch}]; set phases.{phase}.batch_warmup_min to at "
            f"most {cfg.global_batch}, or phases.{phase}.batch_warmup_tokens=0 for no batch warmup"
        )


def check_mix(cfg: TrainConfig, phase: str) -> None:
    p = cfg.phases[phase]
    if p.objective and p.objective_mix:
        raise ConfigError(f"phases.{phase} sets both objective and objective_mix; keep one")
    where = f"phases.{phase}.objective_mix" if p.objective_mix else \
        "objective_mix" if cfg.objective_mix else f"phases.{phase}"
    try:
        mix = cfg.phase_mix(phase)
    except MixError as error:
        raise ConfigError(f"{where}: {error}") from None
    attn = cfg.model.get("attn_implementation", ModelConfig.attn_implementation)
    if attn == "flash" and any(m.attention is Attention.PREFIX for m in mix.members):
        raise ConfigError(f"phase {phase} trains {mix.name}, which attends bidirectionally over a prefix "
                          "and causally after it; flash-attn's kernel cannot: set "
                          "model.attn_implementation=sdpa or flex")
    if not mix.mixed:
        return
    if cfg.optim.loss_normalization != "tokens":
        raise ConfigError(f"{where} normalises each objective over the step's targets: set "
                          "optim.loss_normalization=tokens")
    if attn == "flash" and len({m.causal for m in mix.members}) > 1:
        raise ConfigError(f"{where} ({mix.name}) gives the rows of a micro-batch different attention "
                          "directions, which flash-attn's kernel cannot: set "
                          "model.attn_implementation=sdpa or flex")


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(asdict(cfg)))
