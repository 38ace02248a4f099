"""python -m ettin.train recipe=NAME [hydra overrides]

Runs a recipe's phases in order inside ``<output_dir>/<run_name>/``, resuming from the run's latest
complete checkpoint when there is one (``resume=auto``). With no arguments it runs ``recipe=smoke``:
a tiny encoder and decoder on the built-in corpus, on CPU, exported as Hugging Face folders.

The command sits above the packages it drives (ettin.train, and ettin.cluster for sweeps and
ettin.evaluation / ettin.report for a pair's report), so none of them imports back up; ``python -m
ettin.train`` reaches it through ettin/train/__main__.py.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ettin.cluster.launch import LaunchError, launcher_options, slurm_args
from ettin.cluster.sweep import is_multirun, plan_sweep, run_sweep, submit_sweep
from ettin.optim.schedule import phase_batch_schedule
from ettin.store.checkpoints import CheckpointError
from ettin.store.rundir import RunDir, RunLockedError
from ettin.train.config import (ConfigError, TrainConfig, available_recipes, compose, parse_argv,
                                to_yaml)
from ettin.train.environment import is_rank_zero
from ettin.train.plan import phase_mask_rate
from ettin.train.preemption import Preempted, Stopped, stop_on_signals
from ettin.train.run import log, pair_configs, schedule_rows, train
from ettin.train.step import NonFiniteLossError
from ettin.train.topology import TopologyError

USAGE = """usage: python -m ettin.train [recipe=NAME] [key=value ...]

  recipe=NAME      one of: {recipes} (default: smoke)
  dry_run=true     print the resolved config, parameter count, FLOPs/token and the schedule; exit
  preflight=true   run preflight_steps (2) optimizer steps of every phase at its real shapes on this
                   device: time per step, peak memory (weights, optimizer, activations), whether the
                   micro-batch fits, the whole recipe's wall time and device-hours; writes nothing
  phase=NAME       run one phase alone (e.g. phase=extension init=PATH)
  init=PATH|ID     start from our checkpoint or run dir, a Hugging Face folder or hub id, or a
                   Composer .pt (init_mode=weights|weights+optimizer)
  init_revision=R  a hub revision of init (e.g. step599525, ext1000, decay100)
  resume=auto      (default) continue from the run's latest complete checkpoint; resume=never
                   refuses a run directory that already holds a run; resume=PATH one checkpoint
  -m key=a,b ...   a sweep: one run per combination under <output_dir>/<run_name>-sweep/, one after
                   another, and sweep.csv (status, final train and validation loss per phase); the
                   same command again skips finished members
  -m ... launcher=slurm [slurm.KEY=VALUE ...]   the sweep as one Slurm job array (one task per
                   member; slurm.KEY: python -m ettin.launch's --KEY options, e.g.
                   slurm.gpus_per_node=4 slurm.partition=gpu slurm.time=24:00:00); the same command
                   again submits only members neither done, queued nor running
Any other key of the resolved config can be overridden the Hydra way (e.g. trainer.devices=2).
"""


def dry_run_report(cfg: TrainConfig) -> str:
    from ettin.model.flops import training_flops
    from ettin.model.modernbert import ModernBert
    from ettin.optim.schedule import schedule_table, steps_for

    lines = [f"recipe {cfg.recipe} (run {cfg.run_name}, objective {cfg.objective})", "", to_yaml(cfg)]
    for name in cfg.phases_to_run():
        p = cfg.phases[name]
        mix = cfg.phase_mix(name)
        config = cfg.model_config(name)
        with torch.device("meta"):
            model = ModernBert(config)
        # Targets (and the head's FLOPs) at the phase's mean rate: linear in tokens, so FLOPs are too;
        # a mix's rows train each objective in its weight's share.
        mask_rate = phase_mask_rate(cfg.phases[name])
        # A prefix's attention pairs are averaged over the lengths a row draws.
        flops = sum(w * sum(training_flops(config, [p.seq_len], m.targets_per_row(p.seq_len, mask_rate.mean),
                                           m.causal, [prefix]) for prefix in prefixes) / len(prefixes)
                    for m, w in zip(mix.members, mix.weights)
                    for prefixes in [m.prefix_choices(p.seq_len)]) / p.seq_len
        steps = steps_for(p.tokens, p.seq_len, phase_batch_schedule(p, cfg.global_batch))
        targets = f"{round(mix.targets_per_row(p.seq_len, mask_rate.mean), 1):g} targets per full row"
        masked = any(m.masked for m in mix.members)
        at_a_rate = any(m.masked and not m.bound for m in mix.members)  # MDLM draws a rate per row
        masking = (f"mask rate {mask_rate.start:.0%} -> {mask_rate.end:.0%}, " if at_a_rate else "") + targets \
            + (" on average" if masked or mix.mixed else "")
        lines.append(
            f"phase {name}: objective {mix.name} ({masking}), "
            f"{model.num_parameters():,} parameters, {flops / 1e9:.3f} GFLOP per "
            f"token (training, full {p.seq_len}-token rows), {p.tokens:,} tokens, >= {steps:,} "
            f"optimizer steps (rows at full length; shorter documents mean more steps); "
            + cfg.micro_batches_described(name)
        )
    # As a new run starts: with fresh Adam moments unless init brings its optimizer state.
    fresh = 0 if cfg.init_mode == "weights" else None
    lines += ["", schedule_table(schedule_rows(cfg, fresh_optimizer_phase=fresh)), "", *readiness(cfg)]
    return "\n".join(lines)


def readiness(cfg: TrainConfig) -> list[str]:
    """What a real run would need that is not there yet: the tokenizer and every phase's data."""
    from ettin.data.formats import open_splits, source_format
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


def pair_report(cfg: TrainConfig, runs: list[TrainConfig]) -> Path:
    """Both exports evaluated on the same tasks, and the pair report with its plots."""
    from ettin.evaluation import evaluate
    from ettin.report.pair_report import write_report

    out = Path(cfg.output_dir) / f"{cfg.run_name}-report"
    log.info("evaluating %s on the %s tasks", " and ".join(r.run_name for r in runs), cfg.eval_tasks)
    evaluate([r.run_dir for r in runs], tasks=cfg.eval_tasks, out=out, limit=cfg.eval_limit, seed=cfg.seed)
    # The file, not the returned dict: its per-example files are found beside it (the paired tests).
    return write_report(runs[0].run_dir, runs[1].run_dir, out, evaluation=out / "eval.json")


def run_evaluation(cfg: TrainConfig) -> Path:
    """One run evaluated on the eval tasks into RUN/eval/eval.json, its table on the console."""
    from ettin.evaluation import evaluate
    from ettin.evaluation.cli import format_table

    out = RunDir(cfg.run_dir).evaluation()
    log.info("evaluating %s on the %s tasks", cfg.run_name, cfg.eval_tasks)
    report = evaluate([cfg.run_dir], tasks=cfg.eval_tasks, out=out, limit=cfg.eval_limit, seed=cfg.seed)
    print(format_table(report), flush=True)
    return out / "eval.json"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE.format(recipes=", ".join(available_recipes())))
        return 0
    if is_multirun(argv):
        return sweep([a for a in argv if a not in ("-m", "--multirun")])
    launcher = [a for a in argv if a.startswith(("launcher=", "slurm."))]
    if launcher:
        print(f"error: {' '.join(launcher)}: a launcher submits sweeps (-m); submit one run with "
              "python -m ettin.launch --gpus-per-node G ... -- recipe=...", file=sys.stderr)
        return 2
    recipe, overrides = parse_argv(argv)
    try:
        cfg = compose(recipe, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if cfg.dry_run:
        print(dry_run_report(cfg))
        return 0
    if cfg.preflight:
        from ettin.train.preflight import report as preflight_report

        print(preflight_report(cfg, max(1, cfg.preflight_steps)), flush=True)
        return 0
    runs = pair_configs(cfg) if cfg.pair else [cfg]
    started = time.perf_counter()
    report = None
    with stop_on_signals():
        try:
            finals = [(run, train(run)) for run in runs]
            if cfg.eval_at_end and is_rank_zero():
                report = ("pair report", pair_report(cfg, runs)) if cfg.pair else ("scores", run_evaluation(cfg))
        except Preempted as stop:
            log.info("%s", stop)
            return 0
        except Stopped as stop:  # SIGTERM, SIGINT: 143, 130, and where the same command resumes
            if is_rank_zero():
                print(stop.line(), file=sys.stderr)
            return stop.exit_status
        except NonFiniteLossError as error:
            print(f"error: {error}", file=sys.stderr)
            return 3
        except (TopologyError, ConfigError, CheckpointError, RunLockedError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if is_rank_zero():
        print(summary(finals, time.perf_counter() - started, report))
    return 0


def sweep(argv: list[str]) -> int:
    """One run per combination of the swept values, one after another (or one Slurm job array with
    launcher=slurm), and sweep.csv."""
    from hydra.errors import HydraException

    try:
        launcher, options, argv = launcher_options(argv)
        recipe, overrides = parse_argv(argv)
        plan = plan_sweep(recipe, overrides)
        if launcher == "slurm":
            jobs, table = submit_sweep(plan, slurm_args(options))
        else:
            table = run_sweep(plan)
    except (ConfigError, HydraException, LaunchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table.read_text(), end="")
    with table.open() as f:
        statuses = {row["member"]: row["status"] for row in csv.DictReader(f)}
    if launcher == "slurm":
        print(f"sweep: {table} ({'submitted job array ' + jobs[0] if jobs else 'nothing to submit'}; "
              "the same command again resubmits members that did not finish and updates sweep.csv)")
        return 0
    failed = [member for member, status in statuses.items() if status.startswith("failed")]
    print(f"sweep: {table} ({len(statuses) - len(failed)} of {len(statuses)} members done"
          + (f"; failed: {', '.join(failed)}; see the log named in their status)" if failed else ")"))
    return 1 if failed else 0


def summary(finals: list[tuple[TrainConfig, Path]], seconds: float,
            report: Optional[tuple[str, Path]] = None) -> str:
    from ettin.model.export import pipeline_example

    lines = [f"\nDone in {seconds / 60:.1f} min."]
    for cfg, checkpoint in finals:
        lines.append(f"  {cfg.run_name}: final checkpoint {checkpoint}")
        out = RunDir(cfg.run_dir).export()
        if cfg.export_at_end and out.exists():
            lines.append(f"    Hugging Face folder: {out}")
            lines.append(f"    try: {pipeline_example(out)}")
        elif cfg.export_at_end:
            lines.append("    no Hugging Face folder: see the warning above (not exported)")
    if report is not None:
        what, path = report
        lines.append(f"  {what}: {path}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
