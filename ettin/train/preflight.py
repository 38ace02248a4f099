"""``python -m ettin.train recipe=NAME preflight=true``: a few optimizer steps of every phase at the
recipe's real shapes on the device that is present, and what they say about the whole job.

Each phase runs in a fresh process (so no phase inherits another's memory peak) with the phase's
model (vocabulary, window, RoPE thetas, objective, attention backend), its compile and activation-
checkpointing settings, its precision and optimizer, on full-length rows of random token ids (the
worst case a phase meets; the data is never read, so it need not exist yet). Per phase it prints
seconds per micro-batch and per optimizer step, tokens/s per device, the measured peak memory per
device (weights, gradients and optimizer moments counted from their tensors, the rest - activations
and workspace - measured), the memory model's prediction (ettin/model/memory.py) for the same
micro-batch and for the recipe's, and the projection for the whole recipe on trainer.devices x
trainer.num_nodes devices: wall time, device-hours, and whether the recipe's micro-batch fits the
device, with the setting to change when it does not.

On CPU the rows per micro-batch are 1 (a correctness and memory run: the model's prediction for the
recipe's micro-batch is scaled from there); on a GPU the recipe's micro-batch, or the largest the
model predicts to fit. A phase the model predicts not to fit even so is not run (it would be killed):
its line says so with the numbers. Nothing is written anywhere: no run directory, no checkpoint.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ettin.model.memory import GIB, TrainingMemory, training_memory
from ettin.train.config import TrainConfig, TrainerConfig
from ettin.train.plan import PhasePlan, plan_phase

# Of the memory the device reports free, what a run may plan to use (allocator slack, the data
# loader's workers, other processes).
USABLE_FRACTION = 0.9


class SyntheticVocabulary:
    """What the collators read from a tokenizer, for random token ids: the special ids 0-4 and the
    vocabulary's size."""

    pad_token_id, cls_token_id, sep_token_id, mask_token_id, unk_token_id = 0, 1, 2, 3, 4
    added_tokens_decoder: dict = {}
    all_special_ids = [0, 1, 2, 3, 4]
    name_or_path = "synthetic"

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


@dataclass(frozen=True)
class PhaseMeasure:
    """One phase's preflight in its own process: what it measured (``None`` when it was not run)."""

    phase: str
    rows: int  # rows per micro-batch measured
    seq_len: int
    steps: int
    seconds_per_micro_batch: Optional[float]
    seconds_per_optimizer_update: Optional[float]
    tokens_per_micro_batch: int
    targets_per_micro_batch: int
    weights: int
    gradients: int
    optimizer: int
    peak: Optional[int]  # bytes above the process's start, the whole phase
    predicted: TrainingMemory
    skipped: Optional[str] = None


def device_kind(trainer: TrainerConfig) -> str:
    from ettin.train.environment import trainer_devices

    accelerator, _ = trainer_devices(trainer.accelerator, trainer.devices)
    return "cuda" if accelerator == "gpu" else "cpu"


def free_memory(device: str) -> int:
    """Bytes a run may plan to use on one device now."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free * USABLE_FRACTION)
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(int(line.split()[1]) * 1024 * USABLE_FRACTION)
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _status_bytes(key: str) -> int:
    """VmRSS / VmHWM of this process (the kernel's own resident-set count and its high-water mark)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def preflight_plan(cfg: TrainConfig, phase: str) -> tuple[PhasePlan, int]:
    """The phase's plan without its data (the rows are synthetic) and the vocabulary the synthetic
    rows draw from: with the run's tokenizer when it loads offline, else the size table's model."""
    tokenizer = None
    try:
        from ettin.data.tokenizer import load_tokenizer

        if cfg.tokenizer != "builtin":
            tokenizer = load_tokenizer(cfg.tokenizer)
    except Exception:  # noqa: BLE001 - not there (offline): the recipe's vocabulary size stands in
        pass
    plan = plan_phase(cfg, phase, tokenizer, [], fresh_optimizer=False)
    return plan, len(tokenizer) if tokenizer is not None else plan.model.vocab_size


def predict(plan: PhasePlan, rows: int, num_parameters: int) -> TrainingMemory:
    """The memory model for ``rows`` full rows of the phase on this run's device."""
    targets = round(rows * plan.mix.targets_per_row(plan.seq_len, plan.mask_rate.start))
    device = device_kind(plan.trainer)
    loss = plan.trainer.loss_implementation
    if loss == "auto":
        loss = "chunked" if device == "cuda" else "plain"
    return training_memory(plan.model, [plan.seq_len] * rows, targets,
                           autocast_bf16=device == "cuda" and plan.trainer.precision in ("auto", "bf16-mixed"),
                           activation_checkpointing=plan.trainer.activation_checkpointing,
                           loss_implementation=loss, num_parameters=num_parameters)


def _measure(plan: PhasePlan, vocab: int, rows: int, steps: int, result) -> None:
    """In the phase's own process: ``steps`` optimizer steps of one ``rows``-row micro-batch each."""
    import numpy as np

    from ettin.model.modernbert import ModernBert
    from ettin.optim.stable_adamw import StableAdamW, param_groups
    from ettin.parallel.speedups import apply_speedups
    from ettin.train.environment import set_cpu_threads, trainer_devices

    trainer = plan.trainer
    accelerator, devices = trainer_devices(trainer.accelerator, trainer.devices)
    set_cpu_threads(accelerator, devices, trainer.cpu_threads)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    start_rss = _status_bytes("VmRSS")
    loss = trainer.loss_implementation
    torch.manual_seed(plan.seed)
    model = ModernBert(plan.model, loss_implementation=loss if loss != "auto"
                       else ("chunked" if device.type == "cuda" else "plain")).to(device)
    apply_speedups(model, compile=trainer.compile, activation_checkpointing=trainer.activation_checkpointing)
    settings = plan.settings
    optimizer = StableAdamW(param_groups(model, settings.weight_decay), lr=settings.lr,
                            betas=settings.betas, eps=settings.eps,
                            weight_decay=settings.weight_decay, max_lr=settings.peak_lr)
    bf16 = device.type == "cuda" and trainer.precision in ("auto", "bf16-mixed")
    collator = plan.mix.collator(SyntheticVocabulary(vocab), mask_rate=plan.mask_rate, seed=plan.seed)
    generator = np.random.default_rng(plan.seed)
    first = len(SyntheticVocabulary.all_special_ids)

    def micro_batch(index: int) -> dict:
        samples = []
        for row in range(rows):
            tokens = generator.integers(first, vocab, plan.seq_len)
            tokens[0], tokens[-1] = SyntheticVocabulary.cls_token_id, SyntheticVocabulary.sep_token_id
            samples.append((index * rows + row, tokens))
        batch = collator(samples)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start_rss = torch.cuda.memory_allocated()
    model.train()
    seconds = update_seconds = None
    targets = 0
    for index in range(steps):
        batch = micro_batch(index)
        targets = int(len(batch["target_index"]))
        begun = time.perf_counter()
        # One micro-batch per step: the time of the optimizer update is measured apart (the
        # projection has many micro-batches per update).
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = model(**batch, loss_reduction="sum")
        (out.loss / max(targets, 1)).backward()
        _sync(device)
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        seconds, update_seconds = middle - begun, time.perf_counter() - middle
        del out
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_bytes("VmHWM")) \
        - start_rss
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    moments = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                  for t in state.values() if isinstance(t, torch.Tensor))
    result.put(dict(seconds_per_micro_batch=seconds, seconds_per_optimizer_update=update_seconds,
                    tokens_per_micro_batch=rows * plan.seq_len, targets_per_micro_batch=targets,
                    weights=weights, gradients=weights, optimizer=moments, peak=peak))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_phase(plan: PhasePlan, vocab: int, steps: int) -> PhaseMeasure:
    """The phase's preflight in a fresh process, unless the memory model says it cannot fit."""
    phase, seq_len = plan.phase, plan.seq_len
    device = device_kind(plan.trainer)
    parameters = parameters_of(plan.model)
    free = free_memory(device)
    rows = 1 if device == "cpu" else plan.micro_batch
    while rows > 1 and predict(plan, rows, parameters).peak > free:
        rows //= 2
    predicted = predict(plan, rows, parameters)
    empty = dict(seconds_per_micro_batch=None, seconds_per_optimizer_update=None,
                 tokens_per_micro_batch=rows * seq_len, targets_per_micro_batch=0, weights=4 * parameters,
                 gradients=4 * parameters, optimizer=8 * parameters, peak=None)
    if predicted.peak > free:
        return PhaseMeasure(phase, rows, seq_len, 0, predicted=predicted, **empty, skipped=(
            f"not run: {rows} row(s) of {seq_len} tokens are predicted to need "
            f"{predicted.peak / GIB:.1f} GiB, {free / GIB:.1f} GiB are free"))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(plan, vocab, rows, steps, queue), daemon=True)
    process.start()
    process.join()
    if process.exitcode != 0:
        why = "killed (out of memory?)" if process.exitcode and process.exitcode < 0 else \
            f"failed (exit code {process.exitcode}; its traceback is above)"
        return PhaseMeasure(phase, rows, seq_len, steps, predicted=predicted, **empty, skipped=why)
    return PhaseMeasure(phase, rows, seq_len, steps, predicted=predicted, **queue.get())


def projection(plan: PhasePlan, measure: PhaseMeasure) -> dict:
    """The phase of the whole recipe on trainer.devices x trainer.num_nodes devices, from the
    measured seconds per row (one micro-batch of ``measure.rows`` rows, scaled linearly to the
    recipe's micro-batches) and per optimizer update; rows at full length (a lower bound on steps)."""
    from ettin.optim.schedule import steps_for
    from ettin.train.environment import trainer_devices

    _, devices = trainer_devices(plan.trainer.accelerator, plan.trainer.devices)
    world = devices * plan.trainer.num_nodes
    steps = steps_for(plan.tokens, plan.seq_len, plan.batch_schedule)
    rows_per_device = plan.tokens / plan.seq_len / world
    per_row = measure.seconds_per_micro_batch / measure.rows
    wall = rows_per_device * per_row + steps * measure.seconds_per_optimizer_update
    return dict(world=world, steps=steps, wall_s=wall, device_hours=wall * world / 3600)


def parameters_of(config) -> int:
    """The model's parameter count, built on the meta device without its log line (a start-up
    check must not print a model it does not train)."""
    from ettin.model.modernbert import ModernBert, log as model_log

    level = model_log.level
    model_log.setLevel(logging.WARNING)
    try:
        with torch.device("meta"):
            return ModernBert(config).num_parameters()
    finally:
        model_log.setLevel(level)


def fits(plan: PhasePlan, free: int) -> str:
    """Whether the recipe's micro-batch fits one device by the memory model, and the setting to
    change when it does not."""
    phase, micro_batch = plan.phase, plan.micro_batch
    parameters = parameters_of(plan.model)
    recipe = predict(plan, micro_batch, parameters)
    if recipe.peak <= free:
        return f"fits: micro_batch={micro_batch} needs {recipe.peak / GIB:.1f} of {free / GIB:.1f} GiB"
    best = micro_batch
    while best > 1 and predict(plan, best, parameters).peak > free:
        best -= 1
    advice = []
    if best >= 1 and predict(plan, best, parameters).peak <= free:
        advice.append(f"phases.{phase}.micro_batch={best} (the same global batch, more micro-batches)")
    if not plan.trainer.activation_checkpointing:
        checkpointed = predict(replace(plan, trainer=replace(plan.trainer, activation_checkpointing=True)),
                               micro_batch, parameters)
        if checkpointed.peak <= free:
            advice.append(f"trainer.activation_checkpointing=true ({checkpointed.peak / GIB:.1f} GiB)")
    if not advice:
        state = recipe.weights + recipe.gradients + recipe.optimizer
        advice.append(f"more devices with trainer.strategy=fsdp (weights, gradients and moments alone "
                      f"are {state / GIB:.1f} GiB)" if state > free / 2 else
                      "trainer.activation_checkpointing=true with a smaller phases."
                      f"{phase}.micro_batch")
    return (f"DOES NOT FIT: micro_batch={micro_batch} needs {recipe.peak / GIB:.1f} GiB, "
            f"{free / GIB:.1f} GiB free; set " + " or ".join(advice))


def quadratic_note(plan: PhasePlan) -> Optional[str]:
    """What of the recipe's micro-batch grows with the square of the row length, if anything."""
    memory = predict(plan, plan.micro_batch, parameters_of(plan.model))
    if not memory.quadratic_attention:
        return None
    return (f"{memory.quadratic_attention / GIB:.2f} GiB of the micro-batch's {memory.peak / GIB:.1f} GiB "
            f"are attention scores that grow with the square of the row length ({plan.seq_len} tokens; "
            f"attention {plan.model.attn_implementation} keeps its softmax); sdpa keeps none")


def startup_warnings(plan: PhasePlan) -> list[str]:
    """At the start of a real run, for every phase: a micro-batch predicted not to fit, and quadratic
    attention memory (the memory model only: run preflight=true to measure)."""
    phase = plan.phase
    verdict = fits(plan, free_memory(device_kind(plan.trainer)))
    found = [f"phase {phase}: {verdict} (the memory model; preflight=true measures)"] \
        if verdict.startswith("DOES NOT FIT") else []
    note = quadratic_note(plan)
    return found + ([f"phase {phase}: {note}"] if note else [])


def report(cfg: TrainConfig, steps: int) -> str:
    """Run every phase's preflight and return the table."""
    from ettin.train.environment import trainer_devices

    device = device_kind(cfg.trainer)
    accelerator, devices = trainer_devices(cfg.trainer.accelerator, cfg.trainer.devices)
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    free = free_memory(device)
    lines = [f"preflight: recipe {cfg.recipe} ({cfg.size}, objective {cfg.objective}) on {name}, "
             f"{free / GIB:.1f} GiB usable per device; projection for {devices} x "
             f"{cfg.trainer.num_nodes} {accelerator} device(s); {steps} optimizer step(s) per phase on "
             "random full-length rows; nothing is written",
             f"  settings: attention {cfg.model.get('attn_implementation', 'sdpa')}, compile "
             f"{cfg.trainer.compile}, activation checkpointing {cfg.trainer.activation_checkpointing}, "
             f"precision {cfg.trainer.precision}, loss {cfg.trainer.loss_implementation}"]
    total_wall = total_hours = 0.0
    for phase in cfg.phases_to_run():
        plan, vocab = preflight_plan(cfg, phase)
        m = measure_phase(plan, vocab, steps)
        lines.append(f"phase {phase}: {m.rows} row(s) x {m.seq_len} tokens per micro-batch (recipe: "
                     f"{plan.micro_batch})")
        note = quadratic_note(plan)
        if note:
            lines.append(f"  {note}")
        if m.skipped:
            lines.append(f"  {m.skipped}")
        else:
            other = m.peak - m.weights - m.gradients - m.optimizer
            # One step: the moments did not exist yet during its backward pass.
            predicted = m.predicted.peak if m.steps > 1 else m.predicted.first_step_peak
            error = predicted / m.peak - 1
            lines += [
                f"  time: {m.seconds_per_micro_batch:.2f} s per micro-batch (forward + backward), "
                f"{m.seconds_per_optimizer_update:.2f} s per optimizer update, "
                f"{m.tokens_per_micro_batch / m.seconds_per_micro_batch:,.0f} tokens/s per device",
                f"  memory per device, measured peak {m.peak / GIB:.2f} GiB = weights "
                f"{m.weights / GIB:.2f} + gradients {m.gradients / GIB:.2f} + optimizer "
                f"{m.optimizer / GIB:.2f} + activations and workspace {other / GIB:.2f}",
                f"  memory model: {predicted / GIB:.2f} GiB predicted ({error:+.0%} of the "
                f"measured peak; activations {m.predicted.activations / GIB:.2f}, loss "
                f"{m.predicted.loss / GIB:.2f})",
            ]
            proj = projection(plan, m)
            total_wall += proj["wall_s"]
            total_hours += proj["device_hours"]
            lines.append(f"  whole phase on {proj['world']} device(s): >= {proj['steps']:,} optimizer "
                         f"steps, {_duration(proj['wall_s'])} wall, {proj['device_hours']:,.1f} "
                         "device-hours")
        lines.append("  " + fits(plan, free))
    if total_wall:
        lines.append(f"whole recipe (phases measured): {_duration(total_wall)} wall, "
                     f"{total_hours:,.1f} device-hours on this device kind; full-length rows, no "
                     "validation or checkpoint time; a projection, not a measurement")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds >= 86400 * 2:
        return f"{seconds / 86400:,.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min"
