"""A suite: Ettin's ladder in one directory. Every size's encoder and decoder (the native members;
with ``objectives=[mlm,clm,mdlm]`` also a masked diffusion member), and with ``cross=true`` the two
cross-objective members of each size, each started from its base.

    SUITE_DIR/
      suite.json          the recipe family, the data every member trains on, and each member's
                          last local exit status
      <member>/           a normal run directory (python -m ettin.train output_dir=SUITE_DIR
                          run_name=<member> ...); members are <role>_<size>, e.g. encoder_17m or
                          diffusion_17m; on Slurm also slurm_job (its array task) and slurm.log
                          (what it printed)
      logs/<member>.log   what the member's training printed (local runs)
      slurm/native/, slurm/cross/   each array's launch.sbatch and Slurm's own messages per task
      eval/<member>/eval.json   the member's scores (every member on the same tasks)
      report/             suite.csv, report.md, report.html (ettin.report.suite_report)

A member is composed exactly as ``python -m ettin.train`` composes it (``compose``), so the suite adds
no training logic: locally each member is one ``python -m ettin.train`` process after the other; on
Slurm (``submit_slurm``) the native members are one job array and the cross members a second one that
waits for their bases.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from ettin.cluster.launch import array_spec, queue_state, queue_states, recorded_job, submit
from ettin.model.config import LADDERS
from ettin.store.checkpoints import latest_checkpoint, read_meta
from ettin.store.fs import pid_alive, write_text
from ettin.store.members import BASE, member_name
from ettin.store.rundir import RunDir
from ettin.train.config import ConfigError, TrainConfig, compose

# Every role's objective: the paper's four series and the masked diffusion member (a cross member starts
# from the final weights of its base). A diffusion member is its size's encoder with objective=mdlm: the
# same recipe, data, order, schedule and shape, bidirectional, exported as ModernBertForMaskedLM and
# scored through its bound (ettin-mdlm).
OBJECTIVE_OF_ROLE = {"encoder": "mlm", "decoder": "clm", "diffusion": "mdlm", "encoder_from_decoder": "mntp",
                     "decoder_from_encoder": "clm"}
# objectives= of python -m ettin.suite: each objective's native member (a role without a base), trained
# from scratch.
NATIVE_ROLES = {objective: role for role, objective in OBJECTIVE_OF_ROLE.items() if role not in BASE}
# The recipe a role trains with where it has none of its own (recipes/<role>_<size>.yaml).
RECIPE_ROLE = {"diffusion": "encoder"}
DEFAULT_OBJECTIVES = ("mlm", "clm")
# The recipe families a suite can be made of: recipe= of python -m ettin.suite.
FAMILIES = LADDERS  # a suite's recipe family is a ladder of the size table
STATES = ("done", "queued", "running", "failed", "stopped", "not started")
SUITE_FILE = "suite.json"


class SuiteError(ValueError):
    """A suite that cannot run; the message names the problem and the fix."""


class MemberStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (``signum``) while ``member`` trained (its output in ``log``); it was given
    the same signal."""

    def __init__(self, member: str, log: Path, signum: int) -> None:
        super().__init__(member)
        self.member, self.log, self.signum = member, log, signum


@dataclass(frozen=True)
class Member:
    name: str  # <role>_<size> (member_name), also the run name
    role: str  # one of OBJECTIVE_OF_ROLE
    size: str
    recipe: str
    overrides: tuple[str, ...]  # what python -m ettin.train gets after recipe=
    seed: Optional[int] = None  # with seeds=N: which of the N seeds (1..N), also in its name

    @property
    def origin(self) -> str:
        return "cross" if self.role in BASE else "native"

    @property
    def base(self) -> Optional[str]:
        """The member this one starts from (its size's and seed's other native member), if it is a cross one."""
        return member_name(BASE[self.role], self.size, self.seed) if self.role in BASE else None

    def argv(self) -> list[str]:
        return [f"recipe={self.recipe}", *self.overrides]

    def config(self) -> TrainConfig:
        return compose(self.recipe, list(self.overrides))


@dataclass(frozen=True)
class Suite:
    directory: Path
    family: str
    members: tuple[Member, ...]

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    @property
    def record(self) -> Path:
        return self.directory / SUITE_FILE

    def log(self, member: Member) -> Path:
        return self.directory / "logs" / f"{member.name}.log"


def eval_file(directory: Path | str, member: str) -> Path:
    """Where a member's evaluation lives: ``SUITE_DIR/eval/<member>/eval.json``."""
    return Path(directory) / "eval" / member / "eval.json"


def family_sizes(family: str) -> list[str]:
    """The rungs of a ladder: Ettin's six sizes, or the smoke sizes (the size table's ``ladder``)."""
    from ettin.model.config import SIZES

    return [name for name, row in SIZES.items() if row.ladder == family]


def _smoke_member(role: str, size: str) -> tuple[str, list[str]]:
    recipe = "smoke_cross" if role in BASE else "smoke"
    return recipe, [f"size={size}", f"objective={OBJECTIVE_OF_ROLE[role]}", "pair=false", "eval_at_end=false"]


def _ettin_member(role: str, size: str) -> tuple[str, list[str]]:
    recipe = f"{RECIPE_ROLE.get(role, role)}_{size}"
    return recipe, [f"objective={OBJECTIVE_OF_ROLE[role]}"] if role in RECIPE_ROLE else []


def suite_roles(objectives: Sequence[str], cross: bool) -> list[str]:
    """Each size's members: one native member per objective (in the order given), then with ``cross`` the
    two cross members, which start from the encoder and the decoder."""
    unknown = [o for o in objectives if o not in NATIVE_ROLES]
    if unknown or not objectives:
        raise SuiteError(f"objectives=[{','.join(objectives)}]: choose from {', '.join(NATIVE_ROLES)} "
                         "(objectives=[mlm,clm,mdlm] adds a masked diffusion member per size)")
    roles = list(dict.fromkeys(NATIVE_ROLES[o] for o in objectives))
    if cross and not {"encoder", "decoder"} <= set(roles):
        raise SuiteError("cross=true continues each size's encoder and decoder with the other objective: "
                         "keep mlm and clm in objectives=[...], or drop cross=true")
    return roles + (list(BASE) if cross else [])


def plan(directory: Path | str, family: str = "ettin", sizes: Optional[Sequence[str]] = None,
         cross: bool = False, overrides: Sequence[str] = (), seeds: int = 1,
         objectives: Sequence[str] = DEFAULT_OBJECTIVES) -> Suite:
    """The members of a suite, bases before their cross members, each composed once to check it. With
    ``seeds`` > 1 every member is trained once per seed 1..seeds, each seed a member
    (``encoder_tiny-seed1``, its cross member starting from the same seed's base). ``objectives``: the
    native members of each size (``suite_roles``)."""
    directory = Path(directory).resolve()
    if family not in FAMILIES:
        raise SuiteError(f"recipe={family!r} is not a suite family; choose one of {', '.join(FAMILIES)}")
    roles = suite_roles(objectives, cross)
    known = family_sizes(family)
    sizes = list(known if not sizes else sizes)
    unknown = [s for s in sizes if s not in known]
    if unknown:
        raise SuiteError(f"size(s) {', '.join(unknown)} are not {family} sizes; choose from "
                         f"{', '.join(known)} (sizes=[{','.join(known[:2])}])")
    if seeds < 1:
        raise SuiteError(f"seeds={seeds}: give at least 1 (seeds=3 trains every member with seeds 1, 2, 3)")
    reserved = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in
                ("output_dir", "run_name", "size", "objective", "pair", "init", "recipe")
                + (("seed",) if seeds > 1 else ())]
    if reserved:
        raise SuiteError(f"{', '.join(reserved)}: the suite sets these for each member; drop them "
                         "(sizes=[...] chooses the sizes, recipe= the family)")
    members = []
    for size, seed, role in ((size, seed, role) for size in sizes
                             for seed in (range(1, seeds + 1) if seeds > 1 else (None,))
                             for role in roles):
        name = member_name(role, size, seed)
        recipe, own = (_smoke_member if family == "smoke" else _ettin_member)(role, size)
        own += [f"output_dir={directory}", f"run_name={name}"]
        if role in BASE:
            own.append(f"init={directory / member_name(BASE[role], size, seed)}")
        try:
            composed = compose(recipe, own)
            if seed is not None:  # seed N trains with the recipe's seed + N - 1: seed1 is the one-seed member
                own.append(f"seed={composed.seed + seed - 1}")
            member = Member(name, role, size, recipe, tuple(own + _overrides_for(composed.phases, overrides)), seed)
            member.config()
        except ConfigError as error:
            raise SuiteError(f"member {name} does not compose: {error}") from None
        members.append(member)
    return Suite(directory, family, tuple(members))


def _overrides_for(phases: dict, overrides: Sequence[str]) -> list[str]:
    """The overrides that apply to a member: all but those of a phase it does not have (a cross
    member has only its cross phase, a native one no cross phase)."""
    kept = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~").split(".")
        if key[0] == "phases" and len(key) > 1 and key[1] not in phases:
            continue
        kept.append(item)
    return kept


# ---------------------------------------------------------------------------------------------------
# What a member has trained on, and whether the suite directory holds the same


def training_identity(cfg: TrainConfig) -> dict:
    """What must be the same for a member found in the directory: its recipe, tokenizer and data."""
    return {"recipe": cfg.recipe, "tokenizer": cfg.tokenizer, "data_dir": cfg.data_dir,
            "data": {phase: [asdict(s) for s in sources] for phase, sources in sorted(cfg.data.items())}}


def _recorded_identity(run_dir: Path) -> Optional[dict]:
    from omegaconf import OmegaConf

    path = RunDir(run_dir).config
    if not path.is_file():
        return None
    data = OmegaConf.to_container(OmegaConf.load(path))
    return {"recipe": data.get("recipe"), "tokenizer": data.get("tokenizer"),
            "data_dir": data.get("data_dir"),
            "data": {phase: list(sources) for phase, sources in sorted(data.get("data", {}).items())}}


def check_directory(suite: Suite) -> None:
    """Refuse a directory made by another recipe family, or whose members trained on other data."""
    if suite.record.is_file():
        family = json.loads(suite.record.read_text()).get("family")
        if family != suite.family:
            raise SuiteError(f"{suite.directory} holds a recipe={family} suite, not recipe="
                             f"{suite.family}; use another suite directory (suite_dir=...) or "
                             f"recipe={family}")
    for member in suite.members:
        recorded = _recorded_identity(suite.directory / member.name)
        if recorded is None:
            continue
        wanted = training_identity(member.config())
        different = [f"{key}: {recorded.get(key)!r} there, {wanted[key]!r} now"
                     for key in wanted if recorded.get(key) != wanted[key]]
        if different:
            raise SuiteError(f"member {member.name} in {suite.directory} trained with another "
                             f"recipe or data ({'; '.join(different)}); use another suite directory "
                             "or the same recipe and data")


def _write_record(suite: Suite, exits: dict[str, int]) -> None:
    previous = json.loads(suite.record.read_text()).get("exits", {}) if suite.record.is_file() else {}
    suite.directory.mkdir(parents=True, exist_ok=True)
    write_text(suite.record, json.dumps(
        {"family": suite.family, "members": [
            {"name": m.name, "role": m.role, "size": m.size, "origin": m.origin, "seed": m.seed}
            for m in suite.members],
         "exits": {**previous, **exits}}, indent=2) + "\n")


def recorded_members(directory: Path | str) -> list[dict]:
    """The members suite.json lists (name, role, size, origin), for a report of existing runs."""
    record = Path(directory) / SUITE_FILE
    if not record.is_file():
        raise SuiteError(f"{directory} is not a suite directory (no {SUITE_FILE}); make one with "
                         "python -m ettin.suite")
    return json.loads(record.read_text())["members"]


# ---------------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class MemberStatus:
    member: Member
    state: str  # one of STATES
    tokens: int  # trained so far, all phases
    last_loss: Optional[float]  # the last logged train loss
    log: Path


def finished(member: Member) -> bool:
    """Whether the member's last phase has its phase-end checkpoint."""
    return run_finished(member_dir(member), member.config())


def run_finished(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether the run's last phase has its phase-end checkpoint (a suite's or a sweep's member is
    then skipped by the next run of the same command)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return False
    meta = read_meta(latest)
    return bool(meta.get("phase_end")) and meta.get("phase") == cfg.phases_to_run()[-1]


def member_dir(member: Member) -> Path:
    return Path(dict(o.split("=", 1) for o in member.overrides if "=" in o)["output_dir"]) / member.name


def _training_now(run_dir: Path, queue: Optional[dict[str, str]]) -> bool:
    """A live process holds the run's lock: a Slurm job still in the queue (any Slurm job where the
    queue cannot be read here), or a live local process."""
    lock = RunDir(run_dir).lock
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return False
    job = holder.get("slurm_job_id")
    if job:
        return queue is None or job in queue
    return pid_alive(int(holder.get("pid", -1)))


def _progress(run_dir: Path, phases: list[str]) -> tuple[int, Optional[float]]:
    """Tokens trained over the phases (the last logged count of each) and the last train loss."""
    tokens, loss = 0, None
    for phase in phases:
        path = RunDir(run_dir).metrics(phase)
        if not path.is_file():
            continue
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
        if rows:
            tokens += int(float(rows[-1]["train/tokens"]))
            loss = float(rows[-1]["train/loss"])
    return tokens, loss


def run_state(run_dir: Path, cfg: TrainConfig, queue: Optional[dict[str, str]],
              exit_status: int = 0) -> str:
    """done (its last phase ended), queued or running (its Slurm job is pending or running), running
    (a live process holds its lock), failed (its last local run exited non-zero, or its Slurm job
    left the queue with the run unfinished), stopped (trained in, unfinished: the next run resumes
    it) or not started."""
    if run_finished(run_dir, cfg):
        return "done"
    job = recorded_job(run_dir)
    in_queue = queue_state(job, queue)
    if in_queue:
        return in_queue
    if _training_now(run_dir, queue):
        return "running"
    if exit_status != 0 or (job and queue is not None):  # a job that left a readable queue
        return "failed"
    return "stopped" if RunDir(run_dir).holds_a_run() else "not started"


def status(suite: Suite) -> list[MemberStatus]:
    """Each member's state (``run_state``; a cross member not started because its base did not
    finish is failed), tokens and last loss, and where its log is."""
    exits = json.loads(suite.record.read_text()).get("exits", {}) if suite.record.is_file() else {}
    queue = queue_states(member_dir(m) for m in suite.members)
    rows = []
    for member in suite.members:
        run_dir = member_dir(member)
        cfg = member.config()
        state = run_state(run_dir, cfg, queue, exits.get(member.name, 0))
        tokens, loss = _progress(run_dir, cfg.phases_to_run())
        log = RunDir(run_dir).slurm_log if recorded_job(run_dir) else suite.log(member)
        rows.append(MemberStatus(member, state, tokens, loss, log))
    return rows


def status_table(rows: Sequence[MemberStatus]) -> str:
    lines = [f"{'member':<28} {'state':<12} {'tokens':>14} {'last loss':>9}  log"]
    for r in rows:
        loss = f"{r.last_loss:.3f}" if r.last_loss is not None else "-"
        lines.append(f"{r.member.name:<28} {r.state:<12} {r.tokens:>14,} {loss:>9}  {r.log}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Running locally


def run_local(suite: Suite, python: str = sys.executable) -> dict[str, int]:
    """Every unfinished member, one ``python -m ettin.train`` after the other (a finished one is
    skipped, an unfinished one resumes). A failing member does not stop the others; a cross member
    whose base did not finish is not started (exit status -1 in the record)."""
    check_directory(suite)
    _write_record(suite, {})
    queue = queue_states(member_dir(m) for m in suite.members)
    exits: dict[str, int] = {}
    for member in suite.members:
        if finished(member) or queue_state(recorded_job(member_dir(member)), queue):
            continue  # done, or its Slurm job will train it
        if member.base and not finished(suite.member(member.base)):
            exits[member.name] = -1
            _write_record(suite, exits)
            continue
        RunDir(member_dir(member)).slurm_job.unlink(missing_ok=True)  # trained here from now on
        try:
            exits[member.name] = run_training(member.argv(), suite.log(member), python)
        except KeyboardInterrupt as interrupt:
            raise MemberStopped(member.name, suite.log(member),
                                getattr(interrupt, "signum", signal.SIGINT)) from None
        _write_record(suite, exits)
    return exits


# ---------------------------------------------------------------------------------------------------
# On Slurm


def submit_slurm(suite: Suite, slurm) -> list[str]:
    """The unfinished members that no queued or running job trains, as at most two job arrays (one
    task per member, each a run as ``python -m ettin.launch`` would submit it with the same
    ``slurm`` options): the native members, then the cross members, whose array waits (afterok) for
    every unfinished base's array task. Returns the submitted job ids; nothing when every member is
    done or in the queue.

    afterok rather than aftercorr: aftercorr pairs tasks by index, but a cross member's base may sit
    in an earlier submission's array or be done already, so index pairing breaks on a resubmission of
    some members; naming every base's task is exact. The cost: a cross member waits for all the
    bases of its array, which train side by side anyway."""
    check_directory(suite)
    queue = queue_states(member_dir(m) for m in suite.members)
    todo = [m for m in suite.members
            if not finished(m) and not queue_state(recorded_job(member_dir(m)), queue)]
    _write_record(suite, {m.name: 0 for m in todo})  # a past local failure no longer says the state
    jobs = []
    for origin in ("native", "cross"):
        members = [m for m in todo if m.origin == origin]
        if not members:
            continue
        bases = {suite.member(m.base) for m in members if m.base}
        after = sorted(recorded_job(member_dir(b)) for b in bases if not finished(b))
        spec = array_spec(f"{suite.directory.name}-{origin}", suite.directory / "slurm" / origin,
                          slurm, [m.argv() for m in members], after)
        jobs.append(submit(spec))
    return jobs


def run_training(argv: Sequence[str], log: Path, python: str = sys.executable) -> int:
    """One ``python -m ettin.train ARGV`` with its output appended to ``log``; its exit status. Stopped
    (Ctrl-C, or SIGTERM raised as a KeyboardInterrupt carrying ``signum``), it passes the signal on and
    waits for the member to stop as training stops (so it resumes from where it stopped), then raises."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        member = subprocess.Popen([python, "-m", "ettin.train", *argv], stdout=out, stderr=subprocess.STDOUT)
        try:
            return member.wait()
        except KeyboardInterrupt as interrupt:
            member.send_signal(getattr(interrupt, "signum", signal.SIGINT))
            member.wait()
            raise
