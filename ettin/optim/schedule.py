"""Schedules on the token clock: LR multipliers and the global batch size.

``tokens`` is always the number of non-pad tokens seen BEFORE the step, summed over ranks and counted
from the start of the phase. Every schedule is a small frozen, picklable dataclass (data-loader workers
call the batch schedule), so a resumed run recomputes exactly the same values from the token count
alone; nothing about a schedule needs to be checkpointed.

LR multipliers are relative to the phase's own base LR: the LR of a step is
``phase_lr * multiplier(tokens)``. Each phase states its absolute start LR (phase 3 of Ettin: 0.5 x the
phase-1 peak, decaying to 0.04 of that = 0.02 x peak; docs/recipes.md, phase-3 LR), so nothing is carried
over from the previous phase's scheduler.

Differences from Composer/bert24 (docs/recipes.md), on purpose:

* No one-step lag. Composer steps its scheduler after a batch with the timestamp from before that
  batch, so step n+1 uses f(tokens through step n-1) and the first two steps both run at 1e-10 x peak.
  Here step n uses f(tokens before step n). The difference is one step's worth of tokens on the
  schedule's x axis.
* The warmup-stable-decay multiplier holds ``final_ratio`` for tokens past the end of the phase
  instead of continuing down (Composer clamps at 0), and ``decay_tokens=0`` never divides by zero.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Callable

WARMUP_START = 1e-10  # Composer's LinearScheduler(alpha_i=1e-10): the multiplier at tokens = 0


def _linear_warmup(tokens: int, warmup_tokens: int) -> float:
    return WARMUP_START + (1.0 - WARMUP_START) * min(1.0, max(tokens, 0) / warmup_tokens)


def _check_tokens(name: str, **values: float) -> None:
    for key, value in values.items():
        if value < 0:
            raise ValueError(f"{name}: {key}={value} must be >= 0")


@dataclass(frozen=True)
class WarmupStableDecay:
    """Linear warmup from 1e-10 to 1 over ``warmup_tokens``, flat, then LINEAR decay to
    ``final_ratio`` over the last ``decay_tokens`` of ``total_tokens``:

        t < W:          1e-10 + (1 - 1e-10) t / W
        t < T - D:      1
        otherwise:      1 - min(1, (t - (T - D)) / D) (1 - final_ratio)
    """

    warmup_tokens: int
    decay_tokens: int
    total_tokens: int
    final_ratio: float

    def __post_init__(self) -> None:
        _check_tokens("WarmupStableDecay", warmup_tokens=self.warmup_tokens,
                      decay_tokens=self.decay_tokens, final_ratio=self.final_ratio)
        if self.total_tokens <= 0:
            raise ValueError(f"WarmupStableDecay: total_tokens={self.total_tokens} must be > 0")
        if self.warmup_tokens + self.decay_tokens > self.total_tokens:
            raise ValueError(
                f"WarmupStableDecay: warmup_tokens ({self.warmup_tokens:,}) + decay_tokens "
                f"({self.decay_tokens:,}) exceed the phase's total_tokens ({self.total_tokens:,})")

    @property
    def decay_start(self) -> int:
        return self.total_tokens - self.decay_tokens

    def __call__(self, tokens: int) -> float:
        if tokens < self.warmup_tokens:
            return _linear_warmup(tokens, self.warmup_tokens)
        if self.decay_tokens == 0 or tokens < self.decay_start:
            return 1.0
        progress = min(1.0, (tokens - self.decay_start) / self.decay_tokens)
        return 1.0 - progress * (1.0 - self.final_ratio)


@dataclass(frozen=True)
class OneMinusSqrt:
    """1 - sqrt decay from 1 to ``final_ratio`` over the whole phase (Composer's ``one_minus_sqrt``
    with ``t_decay = t_max``), after an optional linear warmup of ``warmup_tokens`` (Ettin uses none):

        t < W:   1e-10 + (1 - 1e-10) t / W
        else:    r = clamp((t - W) / (T - W), 0, 1);   final_ratio + (1 - final_ratio)(1 - sqrt(r))
    """

    total_tokens: int
    final_ratio: float
    warmup_tokens: int = 0

    def __post_init__(self) -> None:
        _check_tokens("OneMinusSqrt", warmup_tokens=self.warmup_tokens, final_ratio=self.final_ratio)
        if not 0 <= self.warmup_tokens < self.total_tokens:
            raise ValueError(f"OneMinusSqrt: needs 0 <= warmup_tokens ({self.warmup_tokens:,}) < "
                             f"total_tokens ({self.total_tokens:,})")

    def __call__(self, tokens: int) -> float:
        if tokens < self.warmup_tokens:
            return _linear_warmup(tokens, self.warmup_tokens)
        r = min(1.0, max(0.0, (tokens - self.warmup_tokens) / (self.total_tokens - self.warmup_tokens)))
        return self.final_ratio + (1.0 - self.final_ratio) * (1.0 - math.sqrt(r))


@dataclass(frozen=True)
class BatchSizeWarmup:
    """Global batch in sequences, ramping linearly IN STEPS from ``min_batch`` to ``global_batch``.

    The sizes used are ``min_batch, min_batch + increment, min_batch + 2 increment, ...`` while below
    ``global_batch``; if ``increment`` does not divide ``global_batch - min_batch`` the last step up to
    ``global_batch`` is simply smaller than ``increment`` (nothing is ever above ``global_batch``).
    Size ``b`` gets a token budget proportional to ``b`` (bert24's ramp; docs/recipes.md):

        threshold_i = ceil(warmup_tokens * (s_0 + ... + s_i) / (s_0 + ... + s_last))
        batch(t)    = s_i for the first i with t < threshold_i;  global_batch once t >= warmup_tokens

    As a step of size ``b`` consumes tokens in proportion to ``b``, every size lasts about the same
    number of steps. ``warmup_tokens = 0`` (or ``min_batch == global_batch``) means a constant batch.
    Unlike bert24 the clock is the GLOBAL token count (summed over ranks), so the ramp does not depend
    on the number of devices.
    """

    global_batch: int
    min_batch: int
    warmup_tokens: int
    increment: int
    sizes: tuple[int, ...] = field(init=False, repr=False, compare=False)
    thresholds: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.min_batch <= self.global_batch:
            raise ValueError(f"BatchSizeWarmup: needs 0 < min_batch ({self.min_batch}) <= global_batch "
                             f"({self.global_batch})")
        if self.increment <= 0:
            raise ValueError(f"BatchSizeWarmup: increment={self.increment} must be > 0")
        _check_tokens("BatchSizeWarmup", warmup_tokens=self.warmup_tokens)
        sizes = tuple(range(self.min_batch, self.global_batch, self.increment)) if self.warmup_tokens else ()
        total, cumulative, thresholds = sum(sizes), 0, []
        for size in sizes:
            cumulative += size
            thresholds.append(-(-self.warmup_tokens * cumulative // total))  # exact integer ceil
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "thresholds", tuple(thresholds))

    def __call__(self, tokens: int) -> int:
        if not self.sizes or tokens >= self.warmup_tokens:
            return self.global_batch
        return self.sizes[bisect_right(self.thresholds, tokens)]


@dataclass(frozen=True)
class PhaseSchedule:
    """What a phase does over its tokens, for the start-of-run table."""

    name: str
    tokens: int
    seq_len: int
    global_rope_theta: float
    local_rope_theta: float
    lr: float  # the phase's base LR; the LR at t is lr * lr_multiplier(t)
    lr_multiplier: Callable[[int], float]
    global_batch: Callable[[int], int]


def steps_for(tokens: int, seq_len: int, global_batch: Callable[[int], int]) -> int:
    """Optimizer steps to consume ``tokens`` if every row held ``seq_len`` tokens (a lower bound: real
    rows are often shorter). Exact for a ``BatchSizeWarmup``; other callables are simulated step by
    step (capped at 10 million steps)."""
    seen = steps = 0
    while seen < tokens:
        if isinstance(global_batch, BatchSizeWarmup) and seen >= global_batch.warmup_tokens:
            per_step = global_batch.global_batch * seq_len
            return steps + -(-(tokens - seen) // per_step)
        seen += global_batch(seen) * seq_len
        steps += 1
        if steps >= 10_000_000:
            break
    return steps


def format_tokens(n: float) -> str:
    """1.7T, 250B, 8.5B, 400k, 12."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n:.0f}"


def _lr_segments(p: PhaseSchedule) -> list[tuple[int, int, str]]:
    """(start, end, shape) of the LR multiplier's regimes within the phase."""
    m = p.lr_multiplier
    warmup = getattr(m, "warmup_tokens", 0)
    segments = []
    if 0 < warmup < p.tokens:
        segments.append((0, warmup, "linear warmup"))
    start = warmup if 0 < warmup < p.tokens else 0
    if isinstance(m, OneMinusSqrt):
        segments.append((start, p.tokens, "1-sqrt decay"))
    elif isinstance(m, WarmupStableDecay) and 0 < m.decay_tokens and m.decay_start < p.tokens:
        if m.decay_start > start:
            segments.append((start, m.decay_start, "stable"))
        segments.append((m.decay_start, p.tokens, "linear decay"))
    elif isinstance(m, WarmupStableDecay):
        segments.append((start, p.tokens, "stable"))
    else:
        segments.append((start, p.tokens, ""))
    return segments


def _batch_text(p: PhaseSchedule, start: int, end: int) -> str:
    batch = p.global_batch
    first, last = batch(start), batch(max(end - 1, start))
    if first == last:
        return str(first)
    if isinstance(batch, BatchSizeWarmup):
        return f"{first}->{last} (+{batch.increment})"
    return f"{first}->{last}"


def schedule_table(phases: list[PhaseSchedule]) -> str:
    """A readable table for the start of a run: token ranges -> global batch, LR, sequence length and
    RoPE theta, cut at every boundary (LR warmup end, batch-warmup end, decay start, phase end), plus
    a line per batch warmup summarising its ramp."""
    header = (f"{'phase':<10} {'tokens':>17}  {'global batch':>16}  {'LR':>19}  {'LR shape':<13} "
              f"{'seq len':>7}  {'rope theta g/l':>15}")
    lines = [header, "-" * len(header)]
    notes = []
    for p in phases:
        cuts = {0, p.tokens}
        for start, end, _ in _lr_segments(p):
            cuts.update((start, end))
        bw = p.global_batch
        warm = getattr(bw, "warmup_tokens", 0)
        if 0 < warm < p.tokens:
            cuts.add(warm)
        ordered = sorted(t for t in cuts if 0 <= t <= p.tokens)
        segments = _lr_segments(p)
        for start, end in zip(ordered, ordered[1:]):
            shape = next((s for a, b, s in segments if a <= start < b), "")
            lr_start, lr_end = p.lr * p.lr_multiplier(start), p.lr * p.lr_multiplier(end)
            lr = (f"{lr_start:.3g}" if math.isclose(lr_start, lr_end, rel_tol=1e-9)
                  else f"{lr_start:.3g}->{lr_end:.3g}")
            theta = f"{p.global_rope_theta:g}/{p.local_rope_theta:g}"
            lines.append(
                f"{p.name:<10} {format_tokens(start):>7} - {format_tokens(end):>7}  "
                f"{_batch_text(p, start, end):>16}  {lr:>19}  {shape:<13} {p.seq_len:>7}  {theta:>15}"
            )
        if isinstance(bw, BatchSizeWarmup) and bw.sizes and warm < p.tokens:
            per_size = bw.warmup_tokens / sum(bw.sizes) / p.seq_len
            notes.append(
                f"{p.name}: batch warmup {bw.min_batch} -> {bw.global_batch} sequences in "
                f"{len(bw.sizes)} sizes (+{bw.increment}), {format_tokens(warm)} tokens, >= "
                f"{per_size:.3g} steps per size at {p.seq_len} tokens/row (more with shorter rows)"
            )
    return "\n".join(lines + ([""] + notes if notes else []))


def phase_lr_multiplier(phase, *, fresh_optimizer: bool = False):
    """The LR multiplier of a phase config (``PhaseConfig`` or anything with its fields). A phase
    without a warmup of its own that starts with zero Adam moments warms up over
    ``fresh_optimizer_warmup_tokens``: full-LR first steps of a fresh Adam are sign-like and large."""
    warmup = phase.warmup_tokens or (phase.fresh_optimizer_warmup_tokens if fresh_optimizer else 0)
    if phase.lr_schedule == "wsd":
        return WarmupStableDecay(warmup, phase.decay_tokens, phase.tokens, phase.final_lr_ratio)
    return OneMinusSqrt(phase.tokens, phase.final_lr_ratio, warmup_tokens=warmup)


def phase_batch_schedule(phase, global_batch: int) -> "BatchSizeWarmup":
    """The global batch of a phase on its token clock: a ramp from ``batch_warmup_min`` in steps of
    it over ``batch_warmup_tokens``, or ``global_batch`` throughout (``batch_warmup_tokens=0``: no
    warmup, whatever ``batch_warmup_min`` says)."""
    first = (phase.batch_warmup_min or global_batch) if phase.batch_warmup_tokens else global_batch
    return BatchSizeWarmup(global_batch, first, phase.batch_warmup_tokens, first)

