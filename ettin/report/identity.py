"""The proof that two runs saw the same data, in the same order, under the same schedule: from their
recorded metadata, and by replaying the loader's deterministic sample order (ettin.data.loader)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from pathlib import Path

import numpy as np
import pandas as pd

from ettin.report.runs import (Run, RunError, data_sources, recorded_data, recorded_phase_config,
                               recorded_seed)

# Replay bounds of the sample-order check: every step of a small run, a sample of a big one.
MAX_REPLAY_STEPS = 2000
MAX_REPLAY_SAMPLES = 100_000  # samples whose tokens are hashed per phase (reading them is the cost)
SPREAD_POSITIONS = 2000
IDENTICAL, DIFFERS, NOT_RECORDED = "identical", "differs", "not recorded"


@dataclass
class Check:
    name: str
    phase: str  # "" for the whole run
    status: str  # identical / differs / not recorded
    a: Any
    b: Any
    how: str  # where the values come from, what was compared


def _compare(name: str, phase: str, a: Any, b: Any, how: str) -> Check:
    if a is None or b is None:
        status = NOT_RECORDED
    else:
        status = IDENTICAL if a == b else DIFFERS
    return Check(name, phase, status, a, b, how)


def _phase_values(run: Run, phase: str, keys: Sequence[str]) -> Optional[dict]:
    """``keys`` of a phase: from the data identity its phase-end checkpoint recorded when there, else
    from config.yaml (``global_batch`` and ``peak_lr`` are run-level keys there)."""
    p = recorded_phase_config(run, phase)
    if p is None:
        return None
    recorded = recorded_data(run, phase) or {}
    run_level = {"global_batch": run.config.get("global_batch"),
                 "peak_lr": (run.config.get("optim") or {}).get("lr")}
    return {k: recorded[k] if k in recorded else run_level[k] if k in run_level else p.get(k)
            for k in keys}


def _model_shape(run: Run) -> Optional[dict]:
    """The final model's shape: its config without what an objective changes (causal, dropout)."""
    if not run.checkpoints:
        return None
    config = dict(run.checkpoints[-1].meta.get("model_config") or {})
    for key in ("causal", "attn_implementation", "global_rope_theta", "local_rope_theta"):
        config.pop(key, None)
    return {k: v for k, v in config.items() if "dropout" not in k} or None


def _counters(run: Run, phase: str) -> Optional[dict]:
    end = run.phase_end(phase)
    if end is None or not end.meta.get("phase_end"):
        return None
    state = end.meta.get("loader_state") or {}
    return {"steps": state.get("step", end.step), "samples": state.get("samples"),
            "tokens": state.get("tokens", end.tokens)}


def identity_checks(run_a: Run, run_b: Run, *, max_steps: int = MAX_REPLAY_STEPS,
                    spread_positions: int = SPREAD_POSITIONS) -> list[Check]:
    """Every data and schedule identity check of a pair, each identical / differs / not recorded."""
    checks = [
        _compare("phases", "", run_a.phases, run_b.phases, "phase order of config.yaml"),
        _compare("seed", "", recorded_seed(run_a), recorded_seed(run_b),
                 "checkpoint meta data.seed when recorded, else config.yaml seed"),
        _compare("model shape", "", _model_shape(run_a), _model_shape(run_b),
                 "final checkpoint's model_config, without causal, dropout and backend"),
    ]
    phases = run_a.phases + [p for p in run_b.phases if p not in run_a.phases]
    for phase in phases:
        recorded = recorded_data(run_a, phase) is not None and recorded_data(run_b, phase) is not None
        where = "the phase-end checkpoint's recorded data" if recorded else "config.yaml"

        def compare(name: str, keys: Sequence[str], how: str = "") -> Check:
            return _compare(name, phase, _phase_values(run_a, phase, keys),
                            _phase_values(run_b, phase, keys), how or where)

        checks.append(compare("sequence length", ["seq_len"]))
        checks.append(compare("global batch", ["global_batch", "batch_warmup_tokens", "batch_warmup_min"]))
        checks.append(compare("token budget", ["tokens"], "config.yaml phases.<phase>.tokens"))
        checks.append(compare("LR schedule", ["peak_lr", "lr_scale", "lr_schedule", "warmup_tokens",
                                              "decay_tokens", "final_lr_ratio"], "config.yaml"))
        checks.append(compare("RoPE theta", ["global_rope_theta", "local_rope_theta"], "config.yaml"))
        sa, sb = data_sources(run_a, phase), data_sources(run_b, phase)
        checks.append(_compare("data sources (path, weight)", phase,
                               None if sa is None else [(s["path"], s["weight"]) for s in sa],
                               None if sb is None else [(s["path"], s["weight"]) for s in sb],
                               where if recorded else "config.yaml data.<phase>"))
        fa = None if sa is None or any(s["fingerprint"] is None for s in sa) else [s["fingerprint"] for s in sa]
        fb = None if sb is None or any(s["fingerprint"] is None for s in sb) else [s["fingerprint"] for s in sb]
        checks.append(_compare("prepared data fingerprint", phase, fa, fb,
                               "sha256 of each folder's summary.json, " +
                               ("recorded at training" if recorded else "computed now (not recorded)")))
        checks.append(_compare("tokens seen", phase, _counters(run_a, phase), _counters(run_b, phase),
                               "loader counters of the phase-end checkpoint"))
        observed = observed_order_check(run_a, run_b, phase)
        if observed is not None:
            checks.append(observed)
            continue
        replayed = order_checks(run_a, run_b, phase, max_steps=max_steps,
                                spread_positions=spread_positions)
        for check in replayed:
            check.how = (f"{check.how}; replayed because {NO_OBSERVED_DIGESTS} (a run trained before "
                         "data digests)")
        checks.extend(replayed)
    return checks


NO_OBSERVED_DIGESTS = "no data digest observed while training is recorded for both runs"
SAVED_AT_INTERVALS = ("interval", "phase_end")  # preemption saves depend on the job, not the data


def observed_digests(run: Run, phase: str) -> Optional[list[tuple[int, int, str]]]:
    """(step, tokens, data digest) at each interval and phase-end checkpoint of the phase: the rows
    the loader delivered up to there, digested while training (ettin.data.loader.rows_digest); None
    when a checkpoint has none (trained before digests, or resumed from such a checkpoint)."""
    found = []
    for checkpoint in run.checkpoints:
        if checkpoint.phase != phase or checkpoint.meta.get("kind", "phase_end") not in SAVED_AT_INTERVALS:
            continue
        digest = (checkpoint.meta.get("loader_state") or {}).get("data_digest")
        if digest is None:
            return None
        found.append((checkpoint.step, checkpoint.tokens, digest))
    return found or None


def observed_order_check(run_a: Run, run_b: Run, phase: str) -> Optional[Check]:
    """The rows both runs were given, compared checkpoint by checkpoint from the digests their loaders
    observed; None when either run has none recorded (the caller replays instead)."""
    da, db = observed_digests(run_a, phase), observed_digests(run_b, phase)
    if da is None or db is None:
        return None
    how = ("data digests observed by the loaders while training (every row's position and token ids), "
           "compared at each interval and phase-end checkpoint")
    before = (0, 0)
    for (step_a, tokens_a, digest_a), (step_b, tokens_b, digest_b) in zip(da, db):
        if (tokens_a, digest_a) != (tokens_b, digest_b):
            where = f"first differing interval: steps {before[0]}-{step_a} (tokens {before[1]:,}-"
            return Check("sample order", phase, DIFFERS, f"{where}{tokens_a:,}), digest {digest_a[:12]}",
                         f"{where}{tokens_b:,}), digest {digest_b[:12]}", how)
        before = (step_a, tokens_a)
    n = min(len(da), len(db))
    last = da[n - 1]
    if len(da) != len(db):
        how += f" (the {n} both runs have; one run has more)"
    return Check("sample order", phase, IDENTICAL, f"{n} checkpoints to {last[1]:,} tokens, digest "
                 f"{last[2][:12]}", f"{n} checkpoints, the same digests", how)


@dataclass
class Replay:
    """The samples a run's phase consumed, rebuilt from its metadata without training."""

    steps: list[tuple[int, int, str]]  # per step: global batch, step tokens, digest of its token ids
    total_steps: Optional[int]  # steps the run took in the phase (None: not recorded)
    after: dict  # loader counters after the replayed steps
    boundaries: set  # the token clock after each replayed step
    spread: list[tuple[int, str]]  # (position, digest of its tokens) over the whole phase
    total_samples: Optional[int]


def replayed_sources(sources: list[dict]) -> list:
    """The phase's sources as they trained: every recorded DataSource field (format, column,
    cache_dir, ...), not only the path and weight."""
    from dataclasses import fields

    from ettin.data.source import DataSource

    known = {f.name for f in fields(DataSource)}
    return [DataSource(**{k: v for k, v in s.items() if k in known}) for s in sources]


def run_collator(run: Run, phase: str):
    """The collator the run trained the phase with (its objective, its tokenizer): it decides how a
    row is fitted (an MDS row without [CLS] gets one, an encoder row is closed with [SEP]), so the
    replayed token counts are the ones training counted. None when the run recorded no tokenizer."""
    from ettin.data.tokenizer import load_tokenizer
    from ettin.objectives import OBJECTIVES

    tokenizer = next((c.meta.get("tokenizer") for c in reversed(run.checkpoints)
                      if c.meta.get("tokenizer")), None)
    if tokenizer is None or not Path(tokenizer).exists():
        return None
    objective = next((c.meta.get("objective") for c in run.checkpoints if c.phase == phase),
                     run.objective)
    p = run.phase_config(phase)
    return OBJECTIVES[objective].collator(load_tokenizer(tokenizer), mask_rate=p.mask_rate,
                                          seed=int(recorded_seed(run)))


def replay(run: Run, phase: str, *, max_steps: int = MAX_REPLAY_STEPS,
           spread_positions: int = SPREAD_POSITIONS, max_samples: int = MAX_REPLAY_SAMPLES) -> Replay:
    """Replay the loader's order (a function of seed, phase and global sample index) for the first
    ``max_steps`` steps of ``phase`` (fewer if they hold more than ``max_samples`` samples): each
    step's global batch (the batch schedule on the replayed token clock), its tokens and a digest of
    every token id it fed. A phase with more steps also gets ``spread_positions`` positions spread
    over all the samples it consumed."""
    from ettin.data.loader import StepBatches
    from ettin.optim.schedule import phase_batch_schedule

    sources = data_sources(run, phase)
    if sources is None:
        raise RunError(f"{run.path}: no data recorded for phase {phase}")
    if any(s.get("format") == "order" for s in sources):  # its order is the released files' own
        raise RunError(f"{run.name} phase {phase} replays a released data order: compared by its "
                       "files (data sources), not replayed here")
    values = _phase_values(run, phase, ["seq_len", "global_batch", "batch_warmup_tokens",
                                        "batch_warmup_min"])
    p = replace(run.phase_config(phase), seq_len=int(values["seq_len"]),
                batch_warmup_tokens=int(values["batch_warmup_tokens"]),
                batch_warmup_min=int(values["batch_warmup_min"]))
    try:
        batches = StepBatches(replayed_sources(sources), split="train", seq_len=p.seq_len,
                              collator=run_collator(run, phase),
                              global_batch_at=phase_batch_schedule(p, int(values["global_batch"])),
                              micro_batch_size=p.micro_batch, seed=recorded_seed(run), phase=phase)
    except (FileNotFoundError, ValueError) as error:
        raise RunError(f"cannot replay {run.name} phase {phase}: {error}") from None
    counters = _counters(run, phase)
    total = counters["steps"] if counters else None
    wanted = max_steps if total is None else min(max_steps, total)

    def digest(positions: np.ndarray) -> str:
        source, index = batches.mixture.locate(positions)
        h = hashlib.blake2b(digest_size=12)
        for s, i in zip(source, index):
            h.update(np.asarray(batches.splits[int(s)].tokens(int(i)), dtype=np.int64).tobytes())
        return h.hexdigest()

    steps, boundaries, after = [], set(), {"steps": 0, "samples": 0, "tokens": 0}
    plan = batches.plan()
    while len(steps) < wanted and after["samples"] < max_samples:
        state, batch, step_tokens = next(plan)
        steps.append((batch, step_tokens, digest(np.arange(state.samples, state.samples + batch))))
        after = {"steps": state.step + 1, "samples": state.samples + batch,
                 "tokens": state.tokens + step_tokens}
        boundaries.add(after["tokens"])
    spread = []
    samples = counters.get("samples") if counters else None
    if total is not None and len(steps) < total and samples:
        for position in np.unique(np.linspace(0, samples - 1, spread_positions).astype(np.int64)):
            spread.append((int(position), digest(np.array([position]))))
    return Replay(steps, total, after, boundaries, spread, samples)


def order_checks(run_a: Run, run_b: Run, phase: str, *, max_steps: int = MAX_REPLAY_STEPS,
                 spread_positions: int = SPREAD_POSITIONS) -> list[Check]:
    """The sample order of both runs replayed and compared step by step, and each replay checked
    against what the run itself recorded (its final counters and every logged token clock)."""
    replays, reasons = {}, {}
    for key, run in (("a", run_a), ("b", run_b)):
        if phase not in run.phases:
            reasons[key] = f"{run.name} has no phase {phase}"
            continue
        try:
            replays[key] = replay(run, phase, max_steps=max_steps, spread_positions=spread_positions)
        except RunError as error:
            reasons[key] = str(error)
    if reasons:
        why = "; ".join(reasons.values())
        return [Check("sample order", phase, NOT_RECORDED, reasons.get("a", "-"), reasons.get("b", "-"),
                      f"cannot replay: {why}")]
    ra, rb = replays["a"], replays["b"]
    checks = []
    n = min(len(ra.steps), len(rb.steps))
    first = next((i for i in range(n) if ra.steps[i] != rb.steps[i]), None)
    how = (f"replayed the loader order of both runs: {n:,} of {ra.total_steps or '?'} steps compared "
           "(global batch, step tokens, digest of every token id)")
    if ra.spread or rb.spread:
        how += f", plus {len(ra.spread):,} sample positions spread over the phase"
    if first is not None:
        checks.append(Check("sample order", phase, DIFFERS,
                            f"step {first + 1}: batch {ra.steps[first][0]}, {ra.steps[first][1]} tokens, "
                            f"digest {ra.steps[first][2]}",
                            f"step {first + 1}: batch {rb.steps[first][0]}, {rb.steps[first][1]} tokens, "
                            f"digest {rb.steps[first][2]}", how))
    elif len(ra.steps) != len(rb.steps) or ra.spread != rb.spread:
        checks.append(Check("sample order", phase, DIFFERS, f"{len(ra.steps)} steps replayed",
                            f"{len(rb.steps)} steps replayed", how))
    elif n == 0:
        checks.append(Check("sample order", phase, NOT_RECORDED, "no steps", "no steps", how))
    else:
        digest = hashlib.blake2b("".join(s[2] for s in ra.steps).encode(), digest_size=8).hexdigest()
        checks.append(Check("sample order", phase, IDENTICAL, f"{n:,} steps, digest {digest}",
                            f"{n:,} steps, digest {digest}", how))
    consistency = [_replay_matches_record(run, r, phase) for run, r in ((run_a, ra), (run_b, rb))]
    statuses = {c[0] for c in consistency}
    status = DIFFERS if DIFFERS in statuses else NOT_RECORDED if NOT_RECORDED in statuses else IDENTICAL
    checks.append(Check("replay vs the run's own records", phase, status, consistency[0][1],
                        consistency[1][1],
                        "the replayed counters equal the phase-end checkpoint's, and every logged "
                        "train/tokens is a replayed step boundary"))
    return checks


def _replay_matches_record(run: Run, replayed: Replay, phase: str) -> tuple[str, str]:
    recorded = _counters(run, phase)
    problems, notes = [], []
    if recorded is None:
        return NOT_RECORDED, "no phase-end checkpoint"
    if len(replayed.steps) == recorded["steps"]:
        if replayed.after != recorded:
            problems.append(f"replay ends at {replayed.after}, checkpoint says {recorded}")
        else:
            notes.append(f"{recorded['steps']:,} steps, {recorded['samples']:,} samples, "
                         f"{recorded['tokens']:,} tokens as recorded")
    else:
        notes.append(f"first {len(replayed.steps):,} of {recorded['steps']:,} steps replayed")
    logged = run.curve("train/tokens")
    logged = logged[logged["phase"] == phase]["train/tokens"].astype(int)
    if len(replayed.steps) < (recorded["steps"] or 0):
        logged = logged[logged <= replayed.after["tokens"]]
    off = sorted(set(logged) - replayed.boundaries)
    if off:
        problems.append(f"{len(off)} logged train/tokens are no replayed step boundary (first {off[0]:,})")
    elif len(logged):
        notes.append(f"{len(logged):,} logged token counts match")
    if problems:
        return DIFFERS, "; ".join(problems)
    return IDENTICAL, "; ".join(notes)


def checks_table(checks: Sequence[Check]) -> pd.DataFrame:
    """The checks as a table; of two mappings that differ only the keys that differ are shown."""
    rows = []
    for c in checks:
        a, b = c.a, c.b
        if isinstance(a, dict) and isinstance(b, dict) and c.status == DIFFERS:
            keys = [k for k in {**a, **b} if a.get(k) != b.get(k)]
            a, b = {k: a.get(k) for k in keys}, {k: b.get(k) for k in keys}
        rows.append({"check": c.name, "phase": c.phase, "status": c.status, "A": _short(a),
                     "B": _short(b), "how": c.how})
    return pd.DataFrame(rows)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "; ".join(_short(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    text = "not recorded" if value is None else str(value)
    return text if len(text) <= 200 else text[:200] + "..."


# ------------------------------------------------------------------------------------------------
# One run's checkpoints and export (notebooks/checkpoint_analysis.ipynb)


