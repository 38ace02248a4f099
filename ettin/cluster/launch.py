"""python -m ettin.launch: render slurm/ettin.sbatch for a run and submit it with sbatch.

    python -m ettin.launch --nodes 2 --gpus-per-node 4 --account ACC --partition gpu --time 24:00:00 \\
        -- recipe=encoder_150m run_name=enc150m

One wiring only: one task per GPU, all started by one ``srun`` (Lightning's SLURMEnvironment reads the
ranks from SLURM). The script is written to ``<run dir>/launch.sbatch`` and the job's output is
appended to ``<run dir>/slurm.log``; the run dir is the one the training uses (``output_dir/run_name``),
so a requeued job, or the same command submitted again, continues the same run. Everything after
``--`` is passed to ``python -m ettin.train`` verbatim (Hydra overrides); ``trainer.num_nodes``,
``trainer.devices`` and ``trainer.accelerator`` are added to match the allocation.

Inside the job, the training process checks the topology itself (ettin.train.topology).

The same rendering makes job arrays (``array_spec``): the members of a suite or a sweep, one array
task each, every task a run exactly as ``python -m ettin.launch`` would submit it alone (same
allocation, topology check, preemption and requeue). The options are the same, spelled
``slurm.gpus_per_node=4`` after ``launcher=slurm`` (``slurm_args``). Each submitted run records its
job in ``RUN_DIR/slurm_job``, so a second submission leaves queued and running runs alone
(``queue_states``).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ettin.store.rundir import RunDir

TEMPLATE = Path(__file__).resolve().parent / "ettin.sbatch"  # shown in the repository as slurm/ettin.sbatch
DEFAULT_SIGNAL_LEAD_S = 180
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class LaunchError(ValueError):
    """A launch that cannot work; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class ArrayTask:
    """One run of a job array: its name, its run dir and the command every one of its tasks runs."""

    run_name: str
    run_dir: Path
    command: list[str]


@dataclass
class JobSpec:
    """What one sbatch job of a run looks like; with ``array``, one job array of several runs (then
    ``run_name`` names the array and ``run_dir`` is where its script and Slurm's own log go)."""

    run_name: str
    run_dir: Path
    command: list[str]  # what every task runs (a single run; empty for an array)
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0  # 0: CPU tasks
    cpus_per_task: Optional[int] = None
    account: Optional[str] = None
    partition: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None
    signal_lead_s: int = DEFAULT_SIGNAL_LEAD_S
    workdir: Path = field(default_factory=Path.cwd)
    sbatch_args: list[str] = field(default_factory=list)  # extra "#SBATCH <arg>" lines
    env: dict[str, str] = field(default_factory=dict)  # extra exported variables
    array: list[ArrayTask] = field(default_factory=list)  # one array task per run, in index order
    after: list[str] = field(default_factory=list)  # jobs that must complete successfully first

    @property
    def script_path(self) -> Path:
        return RunDir(self.run_dir).launch_script

    @property
    def log_path(self) -> Path:
        return RunDir(self.run_dir).slurm_log

    @property
    def job_name(self) -> str:
        return f"ettin-{self.run_name}"


def _plain_path(path: Path, what: str) -> str:
    text = str(path)
    if re.search(r"\s|['\"$`\\%]", text):
        raise LaunchError(f"{what} {text!r}: SLURM options cannot hold spaces, quotes, '$' or '%'; "
                          "choose a plainer path")
    return text


def _task_lines(spec: JobSpec, run_dir: Path) -> str:
    """Shell lines setting RUN_NAME, RUN_DIR and COMMAND: the run's, or for an array the one its task
    index chooses (whose output then goes to that run's slurm.log, as a single run's does)."""
    def assign(name: str, directory: Path, command: list[str]) -> str:
        return (f"RUN_NAME={shlex.quote(name)} RUN_DIR={_plain_path(directory.resolve(), 'run dir')}"
                f" COMMAND=({shlex.join(command)})")

    if not spec.array:
        return assign(spec.run_name, run_dir, spec.command)
    cases = [f"    {index}) {assign(task.run_name, task.run_dir, task.command)} ;;"
             for index, task in enumerate(spec.array)]
    return "\n".join(['case "$SLURM_ARRAY_TASK_ID" in', *cases,
                      '    *) echo "array task $SLURM_ARRAY_TASK_ID has no run" >&2; exit 2 ;;', "esac",
                      'exec >>"$RUN_DIR/slurm.log" 2>&1'])


def render(spec: JobSpec, template: Optional[str] = None) -> str:
    """The sbatch script for ``spec``; lines whose value is empty (e.g. no --account) are dropped."""
    if spec.nodes < 1 or spec.tasks_per_node < 1:
        raise LaunchError("nodes and tasks per node must be at least 1")
    if spec.signal_lead_s < 1:
        raise LaunchError("the signal lead must be at least 1 second")
    if bool(spec.command) == bool(spec.array):
        raise LaunchError("a job runs either one command or an array of runs")
    run_dir = spec.run_dir if spec.run_dir.is_absolute() else spec.workdir / spec.run_dir
    # Slurm expands %A (array job) and %a (task index) in --output; the path itself holds no '%'.
    log = (f"{_plain_path(run_dir.resolve(), 'array dir')}/%A_%a.log" if spec.array
           else _plain_path(RunDir(run_dir.resolve()).slurm_log, "log path"))
    for key, value in spec.env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(f"--env {key}=...: not a valid variable name")
    values: dict[str, Optional[str]] = {
        "job_name": spec.job_name,
        "nodes": str(spec.nodes),
        "tasks_per_node": str(spec.tasks_per_node),
        "gpus_per_node": str(spec.gpus_per_node) if spec.gpus_per_node else None,
        "cpus_per_task": str(spec.cpus_per_task) if spec.cpus_per_task else None,
        "account": spec.account,
        "partition": spec.partition,
        "qos": spec.qos,
        "time": spec.time,
        "workdir": _plain_path(spec.workdir.resolve(), "working directory"),
        "array": f"0-{len(spec.array) - 1}" if spec.array else None,
        "dependency": "afterok:" + ":".join(spec.after) if spec.after else None,
        "kill_on_invalid_dep": "yes" if spec.after else None,
        "log": log,
        "task": _task_lines(spec, run_dir),
        "signal_lead": str(spec.signal_lead_s),
        "extra_sbatch": "\n".join(f"#SBATCH {arg}" for arg in spec.sbatch_args) or None,
        "extra_env": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in spec.env.items()) or None,
    }
    text = TEMPLATE.read_text() if template is None else template
    lines = []
    for line in text.splitlines():
        names = _PLACEHOLDER.findall(line)
        unknown = [n for n in names if n not in values]
        if unknown:
            raise LaunchError(f"template placeholder(s) {unknown} have no value")
        if any(values[n] in (None, "") for n in names):
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), line))
    return "\n".join(lines) + "\n"


def write_script(spec: JobSpec) -> Path:
    # An array task appends to its run dir's slurm.log from its first line: the dirs exist first.
    for run_dir in [spec.run_dir, *(task.run_dir for task in spec.array)]:
        run_dir.mkdir(parents=True, exist_ok=True)
    spec.script_path.write_text(render(spec))
    spec.script_path.chmod(0o755)
    return spec.script_path


def submit(spec: JobSpec, *, sbatch: str = "sbatch") -> str:
    """Write the script into the run dir and submit it; returns the job id. The run records it in
    its run dir (each run of an array its task's id, ``<job>_<index>``)."""
    if shutil.which(sbatch) is None:
        raise LaunchError(f"{sbatch} not found: run this on a SLURM login node (or use --dry-run)")
    script = write_script(spec)
    result = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise LaunchError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
    job = result.stdout.strip().split(";")[0]
    if not spec.array:
        RunDir(spec.run_dir).slurm_job.write_text(f"{job}\n")
    for index, task in enumerate(spec.array):
        RunDir(task.run_dir).slurm_job.write_text(f"{job}_{index}\n")
    return job


def recorded_job(run_dir: Path) -> Optional[str]:
    """The Slurm job (array task) last submitted for the run, if any."""
    path = RunDir(run_dir).slurm_job
    return (path.read_text().strip() or None) if path.is_file() else None


def queue_states(run_dirs: Iterable[Path]) -> Optional[dict[str, str]]:
    """This user's jobs still in the Slurm queue, array tasks one by one: {id: state}, each task
    under both its ``<job>_<index>`` and its own job id (the one a run lock records). None where
    Slurm is not installed or none of ``run_dirs`` was ever submitted (a local suite or sweep never
    needs the controller); an error where the controller does not answer (whether a run is queued
    is then unknown, and guessing could submit it twice)."""
    if shutil.which("squeue") is None or not any(recorded_job(d) for d in run_dirs):
        return None
    result = subprocess.run(["squeue", "-h", "-r", "--me", "-o", "%i|%A|%T"], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise LaunchError(f"squeue failed ({result.returncode}): {result.stderr.strip()}; whether "
                          "runs are queued is unknown: try again when the Slurm controller answers")
    states = {}
    for line in result.stdout.split():
        task, job, state = line.split("|")
        states[task] = states[job] = state
    return states


def queue_state(job: Optional[str], states: Optional[dict[str, str]]) -> Optional[str]:
    """queued (pending, also after a requeue), running, or None when the job is not in the queue."""
    state = (states or {}).get(job or "")
    if state is None:
        return None
    return "queued" if state.startswith(("PENDING", "REQUEUE")) else "running"


def active_jobs(job_name: str) -> list[str]:
    """Ids of this user's pending or running jobs with that name (empty when squeue is absent)."""
    if shutil.which("squeue") is None:
        return []
    result = subprocess.run(["squeue", "-h", "--me", "--name", job_name, "-o", "%i"],
                            capture_output=True, text=True)
    return result.stdout.split() if result.returncode == 0 else []


# ---------------------------------------------------------------------------------------------------
# The command line


def _override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    found = None
    for item in overrides:
        name, _, value = item.lstrip("+~").partition("=")
        if name == key:
            found = value
    return found


def _build_spec(args: argparse.Namespace, overrides: list[str]) -> JobSpec:
    from ettin.train.config import ConfigError, compose, parse_argv

    if (args.gpus_per_node is None) == (args.cpus_per_node is None):
        raise LaunchError("give exactly one of --gpus-per-node G (slurm.gpus_per_node=G: GPU training, "
                          "one task per GPU) or --cpus-per-node T (slurm.cpus_per_node=T: T CPU tasks "
                          "per node)")
    tasks = args.gpus_per_node if args.gpus_per_node is not None else args.cpus_per_node
    if tasks < 1:
        raise LaunchError("--gpus-per-node / --cpus-per-node must be at least 1")
    accelerator = "gpu" if args.gpus_per_node is not None else "cpu"
    wanted = {"trainer.num_nodes": str(args.nodes), "trainer.devices": str(tasks),
              "trainer.accelerator": accelerator}
    for key, value in wanted.items():
        given = _override_value(overrides, key)
        if given is not None and given != value:
            raise LaunchError(f"{key}={given} contradicts the allocation ({key}={value}); "
                              f"drop it: ettin.cluster.launch sets it from --nodes/--gpus-per-node")
    overrides = [o for o in overrides if _override_value([o], "trainer.num_nodes") is None
                 and _override_value([o], "trainer.devices") is None
                 and _override_value([o], "trainer.accelerator") is None]
    overrides += [f"{k}={v}" for k, v in wanted.items()]

    recipe, hydra_overrides = parse_argv(overrides)
    try:
        cfg = compose(recipe, hydra_overrides)
    except ConfigError as error:
        raise LaunchError(f"the training config does not compose: {error}") from None
    if cfg.dry_run:
        raise LaunchError("dry_run=true would only print the config; run python -m ettin.train "
                          "dry_run=true ... directly")
    cpus = args.cpus_per_task
    if cpus is None:
        cpus = cfg.trainer.num_workers + 2 if accelerator == "gpu" else 1
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise LaunchError(f"--env {item}: expected NAME=VALUE")
        env[key] = value
    return JobSpec(
        run_name=cfg.run_name,
        run_dir=cfg.run_dir,
        command=[args.python, "-m", "ettin.train", *overrides],
        nodes=args.nodes,
        tasks_per_node=tasks,
        gpus_per_node=args.gpus_per_node or 0,
        cpus_per_task=cpus,
        account=args.account,
        partition=args.partition,
        qos=args.qos,
        time=args.time,
        signal_lead_s=args.signal_lead,
        sbatch_args=list(args.sbatch_arg),
        env=env,
    )


def array_spec(name: str, directory: Path, args: argparse.Namespace, runs: Sequence[Sequence[str]],
                after: Sequence[str] = ()) -> JobSpec:
    """One job array of ``runs`` (each a python -m ettin.train ARGV), every task allocated and checked
    as ``python -m ettin.launch`` would submit that run alone; ``directory`` gets the script and
    Slurm's own log; the array waits for every job of ``after`` to complete successfully."""
    if not runs:
        raise LaunchError("an array needs at least one run")
    specs = [_build_spec(args, list(argv)) for argv in runs]
    return replace(specs[0], run_name=name, run_dir=Path(directory), command=[],
                   cpus_per_task=max(s.cpus_per_task or 1 for s in specs), after=list(after),
                   array=[ArrayTask(s.run_name, s.run_dir, s.command) for s in specs])


# ``launcher=slurm slurm.KEY=VALUE``: ettin.launch's own options (--KEY-WITH-HYPHENS VALUE), for the
# commands that submit arrays; those that only make sense for a single submission are not offered.
NOT_FOR_ARRAYS = ("dry_run", "force", "help")
LAUNCHERS = ("local", "slurm")


def slurm_option_names() -> list[str]:
    return [name for name in vars(parser().parse_args([])) if name not in NOT_FOR_ARRAYS]


def slurm_args(options: dict[str, str]) -> argparse.Namespace:
    """``{"gpus_per_node": "4", "time": "24:00:00"}`` (from slurm.KEY=VALUE) as ettin.launch parses
    ``--gpus-per-node 4 --time 24:00:00``, so both commands accept and check the same options."""
    known = slurm_option_names()
    unknown = [key for key in options if key not in known]
    if unknown:
        raise LaunchError(f"{', '.join('slurm.' + k for k in unknown)}: not a Slurm option; choose "
                          f"from {', '.join('slurm.' + k for k in known)}")
    argv = []
    for key, value in options.items():
        option = "--" + key.replace("_", "-")
        argv += [f"{option}={v}" for v in value.strip("[]").split(",")] if key in ("sbatch_arg", "env") \
            else [f"{option}={value}"]
    try:
        return parser(exit_on_error=False).parse_args(argv)
    except argparse.ArgumentError as error:
        name = (error.argument_name or "").split("/")[0].lstrip("-").replace("-", "_")
        raise LaunchError(f"slurm.{name}: {error.message}") from None


def launcher_options(items: Sequence[str]) -> tuple[str, dict[str, str], list[str]]:
    """(the launcher, its slurm.KEY=VALUE options, the other items) of a command line; refuses an
    unknown launcher and Slurm options without launcher=slurm, naming the fix."""
    launcher, options, rest = "local", {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key == "launcher":
            launcher = value
        elif sep and key.startswith("slurm."):
            options[key[len("slurm."):]] = value
        else:
            rest.append(item)
    if launcher not in LAUNCHERS:
        raise LaunchError(f"launcher={launcher}: choose one of {', '.join(LAUNCHERS)} (local: one run "
                          "after another here; slurm: one job array)")
    if options and launcher != "slurm":
        raise LaunchError(f"{', '.join('slurm.' + k for k in options)} given with launcher={launcher}: "
                          "add launcher=slurm to submit to Slurm, or drop the slurm.* options")
    return launcher, options, rest


def parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        exit_on_error=exit_on_error,
        prog="python -m ettin.launch",
        description="Render slurm/ettin.sbatch into the run dir and submit it. Everything after -- "
                    "goes to python -m ettin.train unchanged (recipe=NAME and Hydra overrides).",
        usage="python -m ettin.launch --nodes N (--gpus-per-node G | --cpus-per-node T) "
              "[options] [--dry-run] -- recipe=NAME [key=value ...]",
    )
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node = tasks per node")
    p.add_argument("--cpus-per-node", type=int,
                   help="CPU training: tasks per node (gloo); for tests and debugging")
    p.add_argument("--cpus-per-task", type=int,
                   help="CPUs per task (default: trainer.num_workers + 2 with GPUs, 1 on CPU)")
    p.add_argument("--account")
    p.add_argument("--partition")
    p.add_argument("--qos")
    p.add_argument("--time", help="time limit, e.g. 24:00:00 (default: the partition's)")
    p.add_argument("--signal-lead", type=int, default=DEFAULT_SIGNAL_LEAD_S,
                   help="seconds before the time limit at which SIGUSR1 asks the run to checkpoint "
                        f"and requeue; at least one step plus one save (default {DEFAULT_SIGNAL_LEAD_S})")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="an extra #SBATCH line, e.g. --sbatch-arg=--exclusive (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an extra exported variable, e.g. --env NCCL_SOCKET_IFNAME=ib0 (repeatable)")
    p.add_argument("--python", default=sys.executable,
                   help="the Python on the compute nodes (default: this one, %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    p.add_argument("--force", action="store_true",
                   help="submit even if a job of the same run is already queued or running")
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(ettin.cluster.launch's own options, the training's overrides after ``--``)."""
    argv = list(argv)
    if "--" in argv:
        split = argv.index("--")
        return argv[:split], argv[split + 1:]
    return argv, []


def launch(argv: Sequence[str]) -> tuple[Optional[str], JobSpec, str]:
    """Parse, compose, render and (unless --dry-run) submit: (job id or None, spec, script text)."""
    own, overrides = split_argv(argv)
    args = parser().parse_args(own)
    spec = _build_spec(args, overrides)
    text = render(spec)
    if args.dry_run:
        return None, spec, text
    running = active_jobs(spec.job_name)
    if running and not args.force:
        raise LaunchError(f"run {spec.run_name} already has job(s) {', '.join(running)} queued or "
                          "running; two jobs must not write one run dir (--force to submit anyway)")
    return submit(spec), spec, text


def main(argv: Optional[list[str]] = None) -> int:
    try:
        job, spec, text = launch(sys.argv[1:] if argv is None else argv)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if job is None:
        print(text, end="")
        return 0
    print(f"submitted job {job} for run {spec.run_name}\n"
          f"  script: {spec.script_path}\n  log:    {spec.log_path}  (tail -f it)\n"
          f"  stop:   scancel {job}    preempt now: scancel --batch --signal=USR1 {job}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
