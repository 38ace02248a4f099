"""python -m ettin.compare RUN_A RUN_B [RUN_C] [--out DIR] [--eval EVAL_JSON]  |  --suite SUITE_DIR

The report of two runs: an encoder and a decoder trained as a pair, or any two runs (then an A/B
comparison, labelled by run name); or of three (say an encoder, a decoder and a masked diffusion
model: scores side by side, each pair tested, each run's data checked against RUN_A's). Writes
``report.md``, a self-contained ``report.html`` and the PNG plots into DIR (default: a folder next to
RUN_A named after the pair, ``<name>-report`` for the ``<name>-encoder`` / ``<name>-decoder`` pair of
``python -m ettin.train``, else ``A-vs-B[-vs-C]``): the data and schedule identity of the runs, proven
from their metadata and a replay of the loader's order; evaluation scores side by side (from
``--eval``, else each ``RUN/eval.json``, ``DIR/eval.json`` or ``DIR/checkpoint-eval/eval.json`` when
present); each task's score at the evaluated checkpoints (``python -m ettin.eval RUN --checkpoints
...``), and loss, learning rate, global batch and throughput, on one cumulative token axis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ettin.report import identity
from ettin.report.pair_report import default_out_dir, write_report
from ettin.report.runs import RunError


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ettin.compare", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_a", type=Path, nargs="?", help="a run directory (runs/<run name>)")
    parser.add_argument("run_b", type=Path, nargs="?", help="another run directory")
    parser.add_argument("run_c", type=Path, nargs="?", help="a third run directory (optional): three runs side "
                                                            "by side, tested pair by pair")
    parser.add_argument("--suite", type=Path, help="a suite directory (python -m ettin.suite): rebuild "
                                                   "its report from the members' runs and eval.json")
    parser.add_argument("--out", type=Path, help="where to write the report (default: next to RUN_A, "
                                                 "named after the pair)")
    parser.add_argument("--eval", type=Path, dest="evaluation", action="append",
                        help="an eval.json of python -m ettin.eval with the runs' (or their checkpoints') "
                             "scores; repeat to merge several")
    parser.add_argument("--max-steps", type=int, default=identity.MAX_REPLAY_STEPS,
                        help="steps per phase whose samples are replayed and compared "
                             f"(default {identity.MAX_REPLAY_STEPS}; more steps are sampled)")
    args = parser.parse_args(argv)
    if args.suite is not None:
        return suite_report(args.suite)
    if args.run_a is None or args.run_b is None:
        parser.error("give two run directories, or --suite DIR")
    out = args.out or default_out_dir(args.run_a, args.run_b, args.run_c)
    try:
        report = write_report(args.run_a, args.run_b, out, args.evaluation, run_c=args.run_c,
                              max_steps=args.max_steps)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report: {report}\n        {report.with_suffix('.html')}")
    return 0


def suite_report(directory: Path) -> int:
    from ettin.cluster.suite_members import SuiteError, eval_file, recorded_members
    from ettin.report.suite_report import write_suite_report

    try:
        members = recorded_members(directory)
        files = [eval_file(directory, m["name"]) for m in members]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SuiteError(f"no evaluation for {', '.join(missing)}; run python -m ettin.suite "
                             "(the same command that made the suite) to evaluate every member")
        report = write_suite_report(directory, members, files)
    except (SuiteError, RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report: {report}\n        {report.with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
