"""Evaluate encoders and decoders on the same tasks and print a table (tasks x models).

    python -m ettin.eval MODEL [MODEL ...] [--tasks offline|ettin-paper|t1,t2] [--out DIR] [--limit N]
    python -m ettin.eval RUN --checkpoints all|every:K|NAME,NAME  # a run's checkpoints, one model each
    python -m ettin.eval --list-tasks
    python -m ettin.eval --prefetch --tasks ettin-paper [MODEL ...]     # on a machine with internet

Ctrl-C or SIGTERM stops it with one line and exit status 130 / 143; the same command again continues,
reusing the scores already in eval.json.

MODEL: a Hugging Face ModernBERT or ModernBERT-Decoder folder or hub id (``ID@REVISION`` for a branch,
tag or commit), or an ettin run directory (its export RUN/hf, made from the latest checkpoint if
missing; a prefix LM's RUN/hf-bidirectional, read as trained: ettin.evaluation.models). Writes DIR/eval.json and DIR/eval.log (docs/evaluation.md). The offline tasks are smoke tasks
generated from the built-in corpus.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

SMOKE_NOTE = ("* smoke task: generated from the built-in corpus the smoke models were trained on; it "
              "checks the evaluation path end to end, it is not a benchmark")


def _with_error(result: dict) -> str:
    """``score ± stderr`` (eval.json's stderr_method says how it was made)."""
    stderr = result.get("stderr")
    return f"{result['score']:.4g}" + (f" ± {stderr:.2g}" if stderr is not None else "")


def format_table(report: dict) -> str:
    """Tasks as rows, models as columns (score ± standard error); each row says its metric, its direction
    and whether it is a smoke task."""
    models = list(report["models"])
    tasks = list(dict.fromkeys(t for m in report["models"].values() for t in m["tasks"]))
    header = ["task", "category", "metric", *models]
    rows = []
    for task in tasks:
        first = next(m["tasks"][task] for m in report["models"].values() if task in m["tasks"])
        metrics = sorted({m["tasks"][task]["metric"] for m in report["models"].values() if task in m["tasks"]})
        arrow = "higher better" if first["higher_is_better"] else "lower better"
        scores = [_with_error(m["tasks"][task]) if task in m["tasks"] else "-" for m in report["models"].values()]
        rows.append([task + (" *" if first["smoke"] else ""), first["category"],
                     f"{'/'.join(metrics)} ({arrow})", *scores])
    rows.insert(0, ["", "", "kind / objective",
                    *[f"{m['kind']}/{m['objective'] or '-'}" for m in report["models"].values()]])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(m["tasks"][t]["smoke"] for m in report["models"].values() for t in m["tasks"]):
        lines.append(SMOKE_NOTE)
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ettin.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="a Hugging Face folder or hub id (ID@REVISION), or an ettin run directory")
    parser.add_argument("--tasks", default="offline",
                        help="a suite (offline: the smoke suite, default; ettin-paper: the paper's tasks), "
                             "or a comma-separated list of registered or lm-eval task names")
    parser.add_argument("--list-tasks", action="store_true", help="print every suite and task, then exit")
    parser.add_argument("--prefetch", action="store_true",
                        help="download the tasks' datasets and the hub models into the standard caches "
                             "(for compute nodes without internet), then exit")
    parser.add_argument("--checkpoints", metavar="all|every:K|NAME,NAME",
                        help="evaluate these checkpoints of each MODEL run directory (each one a model "
                             "RUN@CHECKPOINT, exported once to RUN/hf-checkpoints/)")
    parser.add_argument("--out", default="runs/eval", help="folder for eval.json (default runs/eval)")
    parser.add_argument("--limit", type=int, help="examples per task (quick checks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rates", metavar="LR,LR",
                        help="fine-tuning learning rates for classification (replaces the task's grid's)")
    args = parser.parse_args(argv)
    from ettin.evaluation.models import EvalError
    from ettin.evaluation import evaluate
    from ettin.evaluation.registry import list_tasks, resolve_tasks
    from ettin.model.export import ExportError
    from ettin.model.hub import HubError
    from ettin.evaluation.stopping import Stopped, sigterm_as_interrupt

    if args.list_tasks:
        print(list_tasks())
        return 0
    try:
        if args.prefetch:
            from ettin.evaluation.offline import prefetch

            for line in prefetch(resolve_tasks(args.tasks), args.models):
                print(line)
            return 0
        if not args.models:
            parser.error("give at least one MODEL (or --list-tasks)")
        learning_rates = tuple(float(x) for x in args.learning_rates.split(",")) if args.learning_rates else None
        with sigterm_as_interrupt():
            try:
                report = evaluate(args.models, tasks=args.tasks, out=Path(args.out), limit=args.limit,
                                  seed=args.seed, learning_rates=learning_rates, checkpoints=args.checkpoints)
            except KeyboardInterrupt as interrupt:  # outside a task: exporting, hashing, writing
                raise Stopped("preparing or saving the evaluation", interrupt) from None
    except (EvalError, ExportError, HubError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"stopped by {stop.signal_name} while {stop.what}; run the same command again to continue "
              f"(the scores finished so far, in {Path(args.out) / 'eval.json'}, are reused)", file=sys.stderr)
        return stop.exit_status
    from ettin.evaluation.paper import format_comparison

    print(format_table(report))
    comparison = format_comparison(report)
    if comparison:
        print(comparison)
    print(f"wrote {Path(args.out) / 'eval.json'} (the libraries' output: {Path(args.out) / 'eval.log'})")
    return 0
