"""python -m ettin.suite [recipe=ettin|smoke] [sizes=[...]] [objectives=[mlm,clm,mdlm]] [cross=true] [seeds=N]
[launcher=slurm slurm.KEY=V ...] [key=value ...] [status]

The Ettin ladder as one command: every size's encoder and decoder (with ``objectives=[mlm,clm,mdlm]``
also a masked diffusion member; with ``cross=true`` the encoder-from-decoder and decoder-from-encoder of
each size, after their base) trained as members of one suite directory, then every member evaluated
on the same tasks and the suite report written. Running it again skips finished members and resumes
unfinished ones; ``status`` prints each member's state, tokens and last loss. See
ettin/cluster/suite_members.py for the directory's layout.

With ``launcher=slurm`` the command submits the members as job arrays and returns; the same command
again submits only the members that are neither done nor queued nor running, and once every member
is done it evaluates them and writes the report here (evaluation is short next to training, and this
way a failed member is seen and resubmitted before any report claims the ladder).

A member's stored score is reused only when it was made from the member's current weights with the
same settings (ettin.evaluation.provenance). Ctrl-C or SIGTERM stops the suite with one line and exit
status 130 / 143 (a member in training gets the same signal); the same command again continues.
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ettin.cluster.launch import LaunchError, launcher_options, slurm_args, slurm_option_names
from ettin.evaluation.stopping import Stopped, sigterm_as_interrupt
from ettin.cluster.suite_members import (DEFAULT_OBJECTIVES, FAMILIES, NATIVE_ROLES, MemberStopped, Suite,
                                         SuiteError, check_directory, eval_file, plan, recorded_members, run_local,
                                         status, status_table, submit_slurm)

USAGE = """usage: python -m ettin.suite [recipe=ettin|smoke] [sizes=[17m,32m]] [objectives=[mlm,clm,mdlm]]
                            [cross=true] [seeds=N] [launcher=local|slurm] [slurm.KEY=VALUE ...]
                            [key=value ...] [status]

  recipe=FAMILY    {families} (default ettin: recipes <role>_<size>; smoke: the offline one)
  sizes=[A,B]      the sizes (default: the family's all)
  objectives=[..]  each size's members trained from scratch, one per objective: {objectives}
                   (default [mlm,clm]: encoder_<size>, decoder_<size>; mdlm adds diffusion_<size>, the
                   encoder's recipe trained with objective=mdlm, scored through its bound)
  cross=true       also the encoder-from-decoder and decoder-from-encoder of each size (cross members
                   exist for mlm and clm only: the diffusion member has none)
  seeds=N          train every member with N seeds, each seed a member (<role>_<size>-seed1 ...: the
                   recipe's seed + 0 .. N-1); the report draws the seed spread
  suite_dir=DIR    the suite directory (default runs/<family>-suite)
  eval_tasks=T     the tasks every member is evaluated on (default: offline for smoke, else ettin-paper)
  eval_limit=N     at most N examples per task
  launcher=local   (default) members one after another on this machine
  launcher=slurm   submit the members as Slurm job arrays (native members, then the cross members
                   after their bases) and return; the same command again submits only members that
                   are neither done, queued nor running, and once all are done evaluates and reports
  slurm.KEY=VALUE  with launcher=slurm: python -m ettin.launch's --KEY options, e.g.
                   slurm.gpus_per_node=4 slurm.nodes=1 slurm.partition=gpu slurm.account=ACC
                   slurm.time=24:00:00; all of them:
{slurm_options}
  status           print each member's state (done, queued, running, failed, stopped, not started),
                   tokens and last loss; train nothing
Any other key=value is a python -m ettin.train override applied to every member.
"""


@dataclass
class SuiteArgs:
    family: str = "ettin"
    sizes: list[str] = field(default_factory=list)
    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    cross: bool = False
    seeds: int = 1
    suite_dir: Optional[Path] = None
    eval_tasks: Optional[str] = None
    eval_limit: Optional[int] = None
    show_status: bool = False
    launcher: str = "local"
    slurm: dict[str, str] = field(default_factory=dict)  # slurm.KEY=VALUE
    overrides: list[str] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return self.suite_dir or Path("runs") / f"{self.family}-suite"

    @property
    def tasks(self) -> str:
        return self.eval_tasks or ("offline" if self.family == "smoke" else "ettin-paper")


def parse(argv: list[str]) -> SuiteArgs:
    args = SuiteArgs()
    args.launcher, args.slurm, argv = launcher_options(argv)
    for item in argv:
        key, sep, value = item.partition("=")
        if item == "status":
            args.show_status = True
        elif not sep:
            raise SuiteError(f"{item!r}: expected key=value or status (python -m ettin.suite --help)")
        elif key == "recipe":
            args.family = value
        elif key == "sizes":
            args.sizes = _listed(value)
        elif key == "objectives":
            args.objectives = _listed(value)
        elif key == "cross":
            if value.lower() not in ("true", "false"):
                raise SuiteError(f"cross={value}: choose true or false")
            args.cross = value.lower() == "true"
        elif key == "seeds":
            if not value.isdigit() or int(value) < 1:
                raise SuiteError(f"seeds={value}: give a whole number >= 1 (seeds=3 trains every member with "
                                 "three seeds, each seed a member)")
            args.seeds = int(value)
        elif key == "suite_dir":
            args.suite_dir = Path(value)
        elif key == "eval_tasks":
            args.eval_tasks = value
        elif key == "eval_limit":
            args.eval_limit = int(value)
        else:
            args.overrides.append(item)
    return args


def _listed(value: str) -> list[str]:
    """``[a,b]`` (or ``a,b``) -> ["a", "b"]."""
    return [s.strip() for s in value.strip("[]").split(",") if s.strip()]


def evaluate_members(suite: Suite, tasks: str, limit: Optional[int]) -> list[Path]:
    """Each member's eval.json on the same tasks (generated with the same seed). A score already there
    is reused only when its provenance (weights, tokenizer, settings, versions) is the same."""
    from ettin.evaluation import evaluate

    files = []
    for member in suite.members:
        done = eval_file(suite.directory, member.name)
        evaluate([suite.directory / member.name], tasks=tasks, out=done.parent, limit=limit)
        files.append(done)
    return files


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        options = textwrap.fill(", ".join(f"slurm.{k}" for k in slurm_option_names()), width=100,
                                initial_indent=" " * 19, subsequent_indent=" " * 19)
        print(USAGE.format(families=", ".join(FAMILIES), objectives=", ".join(NATIVE_ROLES),
                           slurm_options=options))
        return 0
    try:
        with sigterm_as_interrupt():
            return _run(argv)
    except (SuiteError, LaunchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (Stopped, KeyboardInterrupt) as stop:
        if isinstance(stop, MemberStopped):
            stop = Stopped(f"training member {stop.member} (its log: {stop.log})", stop)
        elif isinstance(stop, KeyboardInterrupt):
            stop = Stopped("writing the suite's records or report", stop)
        print(f"stopped by {stop.signal_name} while {stop.what}; run the same command again to continue "
              "(finished members are skipped, a stopped one resumes, finished scores are reused)",
              file=sys.stderr)
        return stop.exit_status


def _run(argv: list[str]) -> int:
    args = parse(argv)
    suite = plan(args.directory, args.family, args.sizes, args.cross, args.overrides, args.seeds,
                 args.objectives)
    if args.show_status:
        check_directory(suite)
        print(status_table(status(suite)))
        return 0
    if args.launcher == "slurm":
        return submitted(suite, submit_slurm(suite, slurm_args(args.slurm)), args)
    exits = run_local(suite)
    rows = status(suite)
    print(status_table(rows))
    unfinished = [r for r in rows if r.state != "done"]
    if unfinished:
        for r in unfinished:
            why = ("its base did not finish" if exits.get(r.member.name) == -1
                   else f"its Slurm job trains it; log {r.log}" if r.member.name not in exits
                   else f"exit status {exits[r.member.name]}; log {r.log}")
            print(f"{r.member.name}: {r.state} ({why})", file=sys.stderr)
        print("run the same command again to resume the unfinished members", file=sys.stderr)
        return 1
    return report(suite, args)


def submitted(suite: Suite, jobs: list[str], args: SuiteArgs) -> int:
    """After a Slurm submission: the members' states; the report once every member is done."""
    rows = status(suite)
    print(status_table(rows))
    if all(r.state == "done" for r in rows):
        return report(suite, args)
    print(f"submitted job array(s) {', '.join(jobs)}" if jobs else "nothing to submit: every "
          "unfinished member is queued or running", file=sys.stderr)
    print("run the same command again once they have finished: it resubmits members that did not "
          "finish, then evaluates every member and writes the suite report", file=sys.stderr)
    return 0


def report(suite: Suite, args: SuiteArgs) -> int:
    from ettin.report.suite_report import write_suite_report

    written = write_suite_report(suite.directory, recorded_members(suite.directory),
                                 evaluate_members(suite, args.tasks, args.eval_limit))
    print(f"suite report: {written}\n              {written.with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
