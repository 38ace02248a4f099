"""python -m ettin.suite [recipe=ettin|smoke] [sizes=[...]] [cross=true] [key=value ...] [status]

The Ettin ladder as one command: every size's encoder and decoder (and with ``cross=true`` the
encoder-from-decoder and decoder-from-encoder of each size, after their base) trained as members of
one suite directory, then every member evaluated on the same tasks and the suite report written.
Running it again skips finished members and resumes unfinished ones; ``status`` prints each member's
state, tokens and last loss. See ettin/cluster/suite.py for the directory's layout.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ettin.cluster.suite import (FAMILIES, Suite, SuiteError, check_directory, eval_file, plan,
                                 recorded_members, run_local, status, status_table)

USAGE = """usage: python -m ettin.suite [recipe=ettin|smoke] [sizes=[17m,32m]] [cross=true] [key=value ...] [status]

  recipe=FAMILY    {families} (default ettin: recipes <role>_<size>; smoke: the offline one)
  sizes=[A,B]      the sizes (default: the family's all)
  cross=true       also the encoder-from-decoder and decoder-from-encoder of each size
  suite_dir=DIR    the suite directory (default runs/<family>-suite)
  eval_tasks=T     the tasks every member is evaluated on (default: offline for smoke, else ettin-paper)
  eval_limit=N     at most N examples per task
  launcher=local   (default; the only one implemented) members one after another on this machine
  status           print each member's state (done, running, failed, stopped, not started),
                   tokens and last loss; train nothing
Any other key=value is a python -m ettin.train override applied to every member.
"""


@dataclass
class SuiteArgs:
    family: str = "ettin"
    sizes: list[str] = field(default_factory=list)
    cross: bool = False
    suite_dir: Optional[Path] = None
    eval_tasks: Optional[str] = None
    eval_limit: Optional[int] = None
    show_status: bool = False
    overrides: list[str] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return self.suite_dir or Path("runs") / f"{self.family}-suite"

    @property
    def tasks(self) -> str:
        return self.eval_tasks or ("offline" if self.family == "smoke" else "ettin-paper")


def parse(argv: list[str]) -> SuiteArgs:
    args = SuiteArgs()
    for item in argv:
        key, sep, value = item.partition("=")
        if item == "status":
            args.show_status = True
        elif not sep:
            raise SuiteError(f"{item!r}: expected key=value or status (python -m ettin.suite --help)")
        elif key == "recipe":
            args.family = value
        elif key == "sizes":
            args.sizes = [s.strip() for s in value.strip("[]").split(",") if s.strip()]
        elif key == "cross":
            if value.lower() not in ("true", "false"):
                raise SuiteError(f"cross={value}: choose true or false")
            args.cross = value.lower() == "true"
        elif key == "suite_dir":
            args.suite_dir = Path(value)
        elif key == "launcher":
            if value != "local":
                raise SuiteError(f"launcher={value}: only launcher=local is implemented; submit a "
                                 "member to Slurm with python -m ettin.launch -- recipe=... "
                                 "output_dir=SUITE_DIR run_name=MEMBER")
        elif key == "eval_tasks":
            args.eval_tasks = value
        elif key == "eval_limit":
            args.eval_limit = int(value)
        else:
            args.overrides.append(item)
    return args


def evaluate_members(suite: Suite, tasks: str, limit: Optional[int]) -> list[Path]:
    """Each member's eval.json on the same tasks (generated with the same seed), evaluated once per
    tasks and limit."""
    import json

    from ettin.evaluation import evaluate

    files = []
    for member in suite.members:
        done = eval_file(suite.directory, member.name)
        asked = {"tasks": tasks, "limit": limit}
        if not (done.is_file() and json.loads(done.read_text()).get("asked") == asked):
            result = evaluate([suite.directory / member.name], tasks=tasks, out=done.parent, limit=limit)
            done.write_text(json.dumps({**result, "asked": asked}, indent=2) + "\n")
        files.append(done)
    return files


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE.format(families=", ".join(FAMILIES)))
        return 0
    try:
        args = parse(argv)
        suite = plan(args.directory, args.family, args.sizes, args.cross, args.overrides)
        if args.show_status:
            check_directory(suite)
            print(status_table(status(suite)))
            return 0
        exits = run_local(suite)
    except SuiteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = status(suite)
    print(status_table(rows))
    unfinished = [r for r in rows if r.state != "done"]
    if unfinished:
        for r in unfinished:
            why = ("its base did not finish" if exits.get(r.member.name) == -1
                   else f"exit status {exits.get(r.member.name)}; log {r.log}")
            print(f"{r.member.name}: {r.state} ({why})", file=sys.stderr)
        print("run the same command again to resume the unfinished members", file=sys.stderr)
        return 1
    from ettin.report.suite import write_suite_report

    report = write_suite_report(suite.directory, recorded_members(suite.directory),
                                evaluate_members(suite, args.tasks, args.eval_limit))
    print(f"suite report: {report}\n              {report.with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
