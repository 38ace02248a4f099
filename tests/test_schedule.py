"""Token-clock schedules at their boundary points, batch-size warmup, pickling, the start-of-run table."""

from __future__ import annotations

import math
import pickle

import pytest

from ettin.optim.schedule import (
    BatchSizeWarmup,
    OneMinusSqrt,
    PhaseSchedule,
    WarmupStableDecay,
    schedule_table,
    steps_for,
)

A = 1e-10  # Composer's warmup start


# -- warmup-stable-decay -----------------------------------------------------------------------------

def test_wsd_boundary_points():
    W, D, T, f = 1_000, 4_000, 10_000, 0.02
    s = WarmupStableDecay(warmup_tokens=W, decay_tokens=D, total_tokens=T, final_ratio=f)
    assert s(0) == A  # start
    assert s(W // 4) == A + (1 - A) * 0.25  # mid-warmup
    assert s(W // 2) == A + (1 - A) * 0.5
    assert s(W - 1) == A + (1 - A) * ((W - 1) / W)
    assert s(W) == 1.0  # warmup end
    assert s(W + 1) == 1.0 and s((W + T - D) // 2) == 1.0  # stable
    assert s(T - D - 1) == 1.0
    assert s(T - D) == 1.0  # decay start: progress 0
    assert s(T - D + D // 2) == pytest.approx(1 - 0.5 * (1 - f), abs=1e-15)  # mid-decay
    assert s(T - D + D // 4) == pytest.approx(1 - 0.25 * (1 - f), abs=1e-15)
    assert s(T) == pytest.approx(f, abs=1e-15)  # end
    assert s(T + 5_000) == pytest.approx(f, abs=1e-15)  # held after the end


def test_wsd_without_decay_is_warmup_then_flat_to_the_end():
    # Ettin phase 1: t_decay = 0, the LR stays at the peak until the end.
    s = WarmupStableDecay(3_000, 0, 1_700_000, 0.02)
    assert s(1_500) == A + (1 - A) * 0.5
    assert s(3_000) == 1.0 and s(1_699_999) == 1.0 and s(1_700_000) == 1.0 and s(2_000_000) == 1.0


def test_wsd_cross_objective_shape():
    # 50B tokens, 3B warmup, linear decay to 0.02 over the last 10B (recipe.md 2.5).
    B = 1_000_000_000
    s = WarmupStableDecay(3 * B, 10 * B, 50 * B, 0.02)
    assert s(3 * B) == 1.0 and s(40 * B) == 1.0
    assert s(45 * B) == pytest.approx(0.51)
    assert s(50 * B) == pytest.approx(0.02)


def test_wsd_without_warmup_starts_at_one():
    assert WarmupStableDecay(0, 10, 100, 0.5)(0) == 1.0


def test_wsd_refuses_overlapping_warmup_and_decay():
    with pytest.raises(ValueError, match="exceed"):
        WarmupStableDecay(60, 50, 100, 0.1)
    with pytest.raises(ValueError):
        WarmupStableDecay(0, 0, 0, 0.1)
    with pytest.raises(ValueError):
        WarmupStableDecay(-1, 0, 10, 0.1)


# -- 1 - sqrt ----------------------------------------------------------------------------------------

def test_one_minus_sqrt_boundary_points():
    T, f = 10_000, 0.04
    s = OneMinusSqrt(total_tokens=T, final_ratio=f)
    assert s(0) == 1.0  # start: no warmup
    for t in (1, 100, 2_500, 5_000, 9_000, 9_999):
        assert s(t) == f + (1 - f) * (1 - math.sqrt(t / T))
    assert s(T // 4) == pytest.approx(f + (1 - f) * 0.5)  # a quarter in: half way down
    assert s(T) == pytest.approx(f, abs=1e-15)  # end
    assert s(T + 100) == pytest.approx(f, abs=1e-15)
    values = [s(t) for t in range(0, T + 1, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_one_minus_sqrt_phases_as_ettin():
    B = 1_000_000_000
    ext, dec = OneMinusSqrt(250 * B, 0.5), OneMinusSqrt(50 * B, 0.04)
    peak = 8e-4
    assert peak * ext(0) == peak and peak * ext(250 * B) == pytest.approx(4e-4)
    # Phase 3 (decision 4): its own start LR 0.5 x peak, down to 0.02 x peak.
    assert 0.5 * peak * dec(0) == 4e-4 and 0.5 * peak * dec(50 * B) == pytest.approx(1.6e-5)


def test_one_minus_sqrt_with_warmup():
    W, T, f = 1_000, 11_000, 0.1
    s = OneMinusSqrt(T, f, warmup_tokens=W)
    assert s(0) == A
    assert s(W // 2) == A + (1 - A) * 0.5
    assert s(W) == 1.0
    assert s(W + 2_500) == f + (1 - f) * (1 - math.sqrt(0.25))
    assert s(T) == pytest.approx(f, abs=1e-15)
    with pytest.raises(ValueError):
        OneMinusSqrt(100, 0.1, warmup_tokens=100)


# -- batch-size warmup -------------------------------------------------------------------------------

def test_batch_warmup_starts_at_min_is_monotone_and_reaches_global_exactly_at_warmup_tokens():
    bw = BatchSizeWarmup(global_batch=4608, min_batch=288, warmup_tokens=50_000_000, increment=288)
    assert bw(0) == 288
    assert bw.sizes == tuple(range(288, 4608, 288)) and len(bw.sizes) == 15
    values = [bw(t) for t in range(0, 50_000_000, 99_991)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert set(values) == set(bw.sizes)
    assert bw(49_999_999) == 4608 - 288
    assert bw(50_000_000) == 4608 and bw(10**12) == 4608
    assert all(b % 288 == 0 for b in values)


def test_batch_warmup_thresholds_follow_the_formula():
    bw = BatchSizeWarmup(global_batch=10, min_batch=2, warmup_tokens=1_000, increment=2)
    sizes = [2, 4, 6, 8]
    total = sum(sizes)
    thresholds = [math.ceil(1_000 * sum(sizes[: i + 1]) / total) for i in range(len(sizes))]
    assert list(bw.thresholds) == thresholds == [100, 300, 600, 1000]
    for t in range(0, 1_100):
        expected = 10 if t >= 1_000 else sizes[next(i for i, th in enumerate(thresholds) if t < th)]
        assert bw(t) == expected


def test_batch_warmup_gives_each_size_about_the_same_number_of_steps():
    seq = 512  # fixed tokens per sequence
    bw = BatchSizeWarmup(global_batch=4608, min_batch=288, warmup_tokens=1_000_000_000, increment=288)
    tokens, steps = 0, {}
    while tokens < bw.warmup_tokens:
        b = bw(tokens)
        steps[b] = steps.get(b, 0) + 1
        tokens += b * seq
    assert sorted(steps) == list(bw.sizes)
    expected = bw.warmup_tokens / sum(bw.sizes) / seq  # ~452 steps per size
    assert all(abs(n - expected) <= 1.0 for n in steps.values()), steps
    assert bw(tokens) == 4608


def test_batch_warmup_with_an_increment_that_does_not_divide_clamps_the_last_step():
    bw = BatchSizeWarmup(global_batch=100, min_batch=30, warmup_tokens=10_000, increment=25)
    assert bw.sizes == (30, 55, 80)  # then 100: the last step is +20, never above global_batch
    assert bw(0) == 30 and bw(9_999) == 80 and bw(10_000) == 100
    assert max(bw(t) for t in range(0, 20_000, 7)) == 100


def test_constant_batch_cases():
    assert BatchSizeWarmup(4608, 288, 0, 288)(0) == 4608  # no warmup tokens
    assert BatchSizeWarmup(4608, 4608, 10**9, 288)(0) == 4608  # min == global
    assert BatchSizeWarmup(4608, 4608, 0, 4608).sizes == ()


def test_batch_warmup_validation():
    with pytest.raises(ValueError, match="min_batch"):
        BatchSizeWarmup(100, 200, 1_000, 10)
    with pytest.raises(ValueError, match="min_batch"):
        BatchSizeWarmup(100, 0, 1_000, 10)
    with pytest.raises(ValueError, match="increment"):
        BatchSizeWarmup(100, 10, 1_000, 0)
    with pytest.raises(ValueError):
        BatchSizeWarmup(100, 10, -1, 10)


def test_schedules_pickle_round_trip():
    for schedule in (
        WarmupStableDecay(10, 20, 100, 0.02),
        OneMinusSqrt(100, 0.04, warmup_tokens=5),
        BatchSizeWarmup(4608, 288, 50_000, 288),
    ):
        again = pickle.loads(pickle.dumps(schedule))
        assert again == schedule
        assert [again(t) for t in range(0, 120_000, 997)] == [schedule(t) for t in range(0, 120_000, 997)]
    bw = pickle.loads(pickle.dumps(BatchSizeWarmup(4608, 288, 50_000, 288)))
    assert bw.sizes and bw.thresholds[-1] == 50_000


# -- steps and the table -----------------------------------------------------------------------------

def test_steps_for_matches_a_step_by_step_simulation():
    bw = BatchSizeWarmup(64, 8, 100_000, 8)
    seq, total = 128, 1_000_000
    seen = steps = 0
    while seen < total:
        seen += bw(seen) * seq
        steps += 1
    assert steps_for(total, seq, bw) == steps
    assert steps_for(total, seq, lambda t: 64) == math.ceil(total / (64 * seq))


def _phases():
    B = 1_000_000_000
    return [
        PhaseSchedule("pretrain", 1700 * B, 1024, 10_000, 10_000, 8e-4,
                      WarmupStableDecay(3 * B, 0, 1700 * B, 0.02), BatchSizeWarmup(4608, 288, 50 * B, 288)),
        PhaseSchedule("extension", 250 * B, 8000, 160_000, 160_000, 8e-4,
                      OneMinusSqrt(250 * B, 0.5), BatchSizeWarmup(4608, 4608, 0, 4608)),
        PhaseSchedule("decay", 50 * B, 8000, 160_000, 160_000, 4e-4,
                      OneMinusSqrt(50 * B, 0.04), BatchSizeWarmup(4608, 4608, 0, 4608)),
        PhaseSchedule("cross", 50 * B, 8000, 160_000, 160_000, 4e-4,
                      WarmupStableDecay(3 * B, 10 * B, 50 * B, 0.02),
                      BatchSizeWarmup(4608, 288, 10 * B, 288)),
    ]


def test_schedule_table_cuts_at_every_boundary():
    table = schedule_table(_phases())
    lines = table.splitlines()
    rows = [line.split() for line in lines[2:] if line and not line.startswith(("-", " "))]
    pretrain = [r for r in rows if r[0] == "pretrain"]
    assert [(r[1], r[3]) for r in pretrain] == [("0", "3B"), ("3B", "50B"), ("50B", "1.7T")]
    assert "4608" in pretrain[-1] and "0.0008" in pretrain[-1]
    cross = [r for r in rows if r[0] == "cross"]
    assert [(r[1], r[3]) for r in cross] == [("0", "3B"), ("3B", "10B"), ("10B", "40B"), ("40B", "50B")]
    assert "0.0004->8e-06" in cross[-1] and "linear" in cross[-1]
    decay = [r for r in rows if r[0] == "decay"]
    assert len(decay) == 1 and "0.0004->1.6e-05" in decay[0] and "160000/160000" in decay[0]
    assert "8000" in decay[0]
    assert "pretrain: batch warmup 288 -> 4608 sequences in 15 sizes (+288)" in table
    assert "cross: batch warmup" in table and "extension: batch warmup" not in table


def test_schedule_table_accepts_any_callables():
    table = schedule_table([PhaseSchedule("x", 1_000, 128, 10_000, 10_000, 1e-3, lambda t: 1.0, lambda t: 8)])
    assert "x" in table and "0.001" in table


def test_a_fresh_optimizer_warms_up_only_where_the_phase_has_no_warmup_of_its_own():
    from ettin.train.config import compose
    from ettin.optim.schedule import phase_lr_multiplier

    cfg = compose("decoder_150m")
    decay, pretrain = cfg.phases["decay"], cfg.phases["pretrain"]
    warm = decay.fresh_optimizer_warmup_tokens
    assert warm == 1_000_000_000 and decay.warmup_tokens == 0
    fresh, continued = phase_lr_multiplier(decay, fresh_optimizer=True), phase_lr_multiplier(decay)
    assert fresh(0) < 1e-9 and fresh(warm // 2) == pytest.approx(0.5, rel=1e-6)
    assert continued(0) == 1.0  # moments carried over from the previous phase: no warmup
    assert fresh(decay.tokens) == pytest.approx(continued(decay.tokens)) == pytest.approx(0.04)
    # A phase with its own warmup keeps it, fresh optimizer or not.
    assert phase_lr_multiplier(pretrain, fresh_optimizer=True)(pretrain.warmup_tokens // 2) == \
        pytest.approx(0.5, rel=1e-6)
