"""Schedules on the token clock: LR multipliers and the global batch size.

``tokens`` is always the number of non-pad tokens seen before the step, summed over ranks, counted
from the start of the phase. Every schedule is a small picklable object (data-loader workers call the
batch schedule), so a resumed run recomputes exactly the same values from the token count alone.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class WarmupStableDecay:
    """Linear warmup from ~0 to 1, flat, then linear decay to ``final_ratio`` over the last tokens."""

    warmup_tokens: int
    decay_tokens: int
    total_tokens: int
    final_ratio: float

    def __call__(self, tokens: int) -> float:
        if tokens < self.warmup_tokens:
            return max(tokens / self.warmup_tokens, 1e-10)  # Composer starts at 1e-10 too
        decay_start = self.total_tokens - self.decay_tokens
        if tokens < decay_start or self.decay_tokens == 0:
            return 1.0
        progress = min((tokens - decay_start) / self.decay_tokens, 1.0)
        return 1.0 - progress * (1.0 - self.final_ratio)


@dataclass(frozen=True)
class OneMinusSqrt:
    """1 - sqrt decay from 1 to ``final_ratio`` over the whole phase (after an optional warmup)."""

    total_tokens: int
    final_ratio: float
    warmup_tokens: int = 0

    def __call__(self, tokens: int) -> float:
        if tokens < self.warmup_tokens:
            return max(tokens / self.warmup_tokens, 1e-10)
        span = self.total_tokens - self.warmup_tokens
        progress = min(max(tokens - self.warmup_tokens, 0) / span, 1.0)
        return self.final_ratio + (1.0 - self.final_ratio) * (1.0 - math.sqrt(progress))


@dataclass(frozen=True)
class BatchSizeWarmup:
    """Global batch (sequences) ramping linearly in steps from ``min_batch`` to ``global_batch``.

    Sizes min, min + increment, ... below ``global_batch`` each get a token budget proportional to the
    size, so each is used for about the same number of steps (bert24's ramp); the full batch is used
    from ``warmup_tokens`` on. ``warmup_tokens == 0`` means a constant batch.
    """

    global_batch: int
    min_batch: int
    warmup_tokens: int
    increment: int
    sizes: tuple[int, ...] = field(init=False, repr=False)
    thresholds: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.min_batch <= self.global_batch or self.increment <= 0:
            raise ValueError(
                f"batch warmup needs 0 < min_batch ({self.min_batch}) <= global_batch "
                f"({self.global_batch}) and increment > 0 ({self.increment})"
            )
        sizes = tuple(range(self.min_batch, self.global_batch, self.increment))
        total = sum(sizes)
        cumulative, thresholds = 0, []
        for size in sizes:
            cumulative += size
            thresholds.append(self.warmup_tokens * cumulative / total)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "thresholds", tuple(thresholds))

    def __call__(self, tokens: int) -> int:
        if self.warmup_tokens <= 0 or tokens >= self.warmup_tokens or not self.sizes:
            return self.global_batch
        return self.sizes[min(bisect_right(self.thresholds, tokens), len(self.sizes) - 1)]


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
    """Optimizer steps for ``tokens`` if every row were ``seq_len`` tokens long (a lower bound)."""
    seen = steps = 0
    while seen < tokens:
        seen += global_batch(seen) * seq_len
        steps += 1
        if steps > 10_000_000:
            break
    return steps


def _tokens(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n:.0f}"


def schedule_table(phases: list[PhaseSchedule]) -> str:
    """Token ranges -> global batch, LR, sequence length and RoPE theta, at every boundary."""
    header = f"{'phase':<10} {'tokens':>17} {'global batch':>13} {'LR':>10} {'seq len':>8} {'rope theta g/l':>16}"
    lines = [header, "-" * len(header)]
    for p in phases:
        points = {0, p.tokens}
        for t in _boundaries(p):
            points.add(t)
        ordered = sorted(points)
        for start, end in zip(ordered, ordered[1:]):
            lr_start, lr_end = p.lr * p.lr_multiplier(start), p.lr * p.lr_multiplier(end)
            batch_start, batch_end = p.global_batch(start), p.global_batch(max(end - 1, start))
            batch = str(batch_start) if batch_start == batch_end else f"{batch_start}->{batch_end}"
            lr = f"{lr_start:.2e}" if math.isclose(lr_start, lr_end) else f"{lr_start:.1e}->{lr_end:.1e}"
            lines.append(
                f"{p.name:<10} {_tokens(start):>7} - {_tokens(end):>7} {batch:>13} {lr:>10} "
                f"{p.seq_len:>8} {p.global_rope_theta:>8g}/{p.local_rope_theta:g}"
            )
    return "\n".join(lines)


def _boundaries(p: PhaseSchedule) -> list[int]:
    """Where the LR or batch schedule changes regime: warmup ends, decay starts."""
    points = [getattr(p.lr_multiplier, "warmup_tokens", 0), getattr(p.global_batch, "warmup_tokens", 0)]
    decay = getattr(p.lr_multiplier, "decay_tokens", 0)
    if decay:
        points.append(p.tokens - decay)
    return [t for t in points if 0 < t < p.tokens]
