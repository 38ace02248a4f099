"""Checkpoints on disk: written atomically, found by the token clock, pruned, loaded safely.

This is the filesystem layer only; what goes into a checkpoint is decided by the caller's
``write_fn``. A checkpoint is a directory ``RUN_DIR/checkpoints/<name>/`` holding whatever ``write_fn``
wrote (the trainer writes ``model.safetensors``, ``optimizer.pt``, ``rng.pt``, ``config.yaml``), the
caller's ``meta.json`` and, last, an empty ``COMPLETE`` marker.

Atomicity: everything is written into ``RUN_DIR/checkpoints/.tmp-<name>-<pid>/``; every file and
directory in it is fsynced, then ``COMPLETE`` is written and fsynced, the directory is renamed to its
final name and the parent directory is fsynced. A crash or kill at any point leaves either no
directory under the final name or a complete one, so the previous checkpoint stays the latest
usable one. Temporary directories left by a crash are deleted by the next write (never those of a
process that is still alive). ``meta.json`` records the sha256 of every file, verified on load.

Ordering: ``meta.json`` must hold ``tokens`` and ``step`` (the token clock and step AFTER the saved
step, counted from the start of the phase) and may hold ``phase_index`` (the phase's position in the
recipe; 0 when absent). Checkpoints are ordered by ``(phase_index, tokens, step)``: the token clock
restarts at each phase, so a later phase's first checkpoint is later than the previous phase's last.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
META = "meta.json"
WEIGHTS = "model.safetensors"
TEMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


def checkpoints_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        # Some filesystems (certain network and FUSE mounts) cannot fsync a directory; files must.
        if not (path.is_dir() and error.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (directories after their contents)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(directory) / name
            if not path.is_symlink():
                _fsync_path(path)
        _fsync_path(Path(directory))


def _remove_stale_temps(root: Path) -> None:
    """Delete what interrupted writes left behind. A complete checkpoint that was moved aside to be
    replaced by a same-named one (``.tmp-old-<name>-<pid>``) is put back if the new one never landed."""
    for stale in sorted(root.glob(f"{TEMP_PREFIX}*")):
        owner = re.search(r"-(\d+)$", stale.name)
        if owner and int(owner.group(1)) != os.getpid() and pid_alive(int(owner.group(1))):
            continue  # another live process is writing it (a second run is refused by RunLock)
        old = re.match(rf"^{re.escape(TEMP_PREFIX)}old-(.+)-\d+$", stale.name)
        if old and is_complete(stale) and not (root / old.group(1)).exists():
            log.warning("restoring %s, moved aside by an interrupted checkpoint write", old.group(1))
            os.replace(stale, root / old.group(1))
            continue
        log.warning("removing %s, left by an interrupted checkpoint write", stale)
        shutil.rmtree(stale, ignore_errors=True)


def write_checkpoint(run_dir: Path | str, name: str, write_fn: Callable[[Path], None], meta: dict) -> Path:
    """Write the checkpoint ``RUN_DIR/checkpoints/<name>/`` atomically and return its path.

    ``write_fn(directory)`` writes the checkpoint's files into a temporary directory; ``meta`` (JSON
    serialisable, with ``tokens`` and ``step``) becomes ``meta.json``. If ``write_fn`` raises, the
    temporary directory is removed and the error propagates; existing checkpoints are untouched. A
    checkpoint already under ``name`` (the same step saved twice, e.g. a phase end right after an
    interval save) is replaced by the new one.
    """
    if not _NAME.match(name):
        raise ValueError(f"checkpoint name {name!r}: use letters, digits and . _ + = - "
                         f"(not starting with '.' or '-')")
    for key in ("tokens", "step"):
        if not isinstance(meta.get(key), int):
            raise ValueError(f"checkpoint meta needs an integer {key!r}; got {meta.get(key)!r}")
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        _fsync_path(root.parent)
    _remove_stale_temps(root)
    final = root / name
    temp = root / f"{TEMP_PREFIX}{name}-{os.getpid()}"
    temp.mkdir()
    try:
        write_fn(temp)
        for reserved in (META, COMPLETE):
            if (temp / reserved).exists():
                raise ValueError(f"write_fn must not write {reserved}; write_checkpoint writes it")
        meta = {**meta, "sha256": {str(f.relative_to(temp)): sha256_file(f)
                                   for f in sorted(temp.rglob("*")) if f.is_file()}}
        (temp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _fsync_tree(temp)
        (temp / COMPLETE).write_text("")  # last: a directory with this file is whole
        _fsync_path(temp / COMPLETE)
        _fsync_path(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    old = None
    if final.exists():  # a directory cannot be renamed onto a non-empty one: move the old one aside
        old = root / f"{TEMP_PREFIX}old-{name}-{os.getpid()}"
        os.replace(final, old)
    try:
        os.replace(temp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _fsync_path(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(path: Path | str) -> bool:
    path = Path(path)
    return path.is_dir() and (path / COMPLETE).is_file() and (path / META).is_file()


def read_meta(path: Path | str) -> dict:
    """The ``meta.json`` of a checkpoint directory."""
    return json.loads((Path(path) / META).read_text())


def _order(meta: dict) -> tuple[int, int, int]:
    return int(meta.get("phase_index", 0)), int(meta["tokens"]), int(meta["step"])


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """The complete checkpoints of a run, oldest first by ``(phase_index, tokens, step)``.

    Temporary directories, directories without ``COMPLETE`` and unreadable metadata are skipped."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(".") or not is_complete(path):
            continue
        try:
            found.append((_order(read_meta(path)), path.name, path))
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("ignoring checkpoint %s: unreadable meta.json (%s)", path, error)
    return [path for _, _, path in sorted(found)]


def latest_checkpoint(run_dir: Path | str) -> Optional[Path]:
    """The complete checkpoint with the highest ``(phase_index, tokens, step)``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path | str, keep_last: int,
                      keep: Callable[[dict], bool] = lambda meta: bool(meta.get("phase_end"))) -> list[Path]:
    """Delete complete checkpoints except the newest ``keep_last`` and those where ``keep(meta)`` is
    true (by default: ``phase_end: true``). ``keep_last`` must be >= 1, so the latest checkpoint is
    never deleted. Temporary and incomplete directories are not touched. Returns what was deleted."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: at least the latest checkpoint must be kept")
    found = list_checkpoints(run_dir)
    deleted = []
    for path in found[: max(len(found) - keep_last, 0)]:
        if not keep(read_meta(path)):
            # Take it out of the complete set first, so a crash mid-delete leaves no half checkpoint.
            (path / COMPLETE).unlink()
            shutil.rmtree(path)
            deleted.append(path)
    return deleted


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do instead."""


def verify_checkpoint(path: Path | str) -> None:
    """Check every file of a checkpoint against the sha256 recorded in its ``meta.json`` (checkpoints
    written before hashes were recorded pass). Raises :class:`CheckpointError` naming the file and the
    previous complete checkpoint of the run to resume from."""
    path = Path(path)
    recorded = read_meta(path).get("sha256", {})
    for name, expected in recorded.items():
        file = path / name
        problem = "is missing" if not file.is_file() else (
            "does not match the sha256 recorded when it was written (corrupted or modified)"
            if sha256_file(file) != expected else None)
        if problem:
            raise CheckpointError(f"{file} {problem}. {_fallback_hint(path)}")


def _fallback_hint(path: Path) -> str:
    run_dir = path.parent.parent
    earlier = [c for c in list_checkpoints(run_dir) if c != path]
    earlier = [c for c in earlier if _order(read_meta(c)) < _order(read_meta(path))] if is_complete(path) \
        else earlier
    if earlier:
        return (f"Resume from the previous complete checkpoint with resume={earlier[-1]} (or delete "
                f"{path} and rerun: resume=auto then takes the latest good one).")
    return "No earlier complete checkpoint exists in this run; start it again with another run_name."


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The embeddings and the vocabulary projection share one tensor; safetensors cannot store shared
# storage, so a checkpoint holds it under one of the two names.
TIED = ("model.embeddings.tok_embeddings.weight", "decoder.weight")


def save_weights(state: dict[str, torch.Tensor], directory: Path | str) -> None:
    """``state`` as ``directory/model.safetensors``, on CPU, the tied pair stored once."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k != TIED[1]}
    save_file(tensors, str(Path(directory) / WEIGHTS), metadata={"format": "pt"})


def load_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint directory (or a ``.safetensors`` file), via safetensors:
    loading runs no code. The tied embeddings / ``decoder.weight`` pair, stored once, gets both names."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in {path}")
    try:
        return retie(load_file(str(file)))
    except Exception as error:  # safetensors raises its own (Rust) errors, naming no file
        raise CheckpointError(f"{file} is not a readable safetensors file ({error}). "
                              f"{_fallback_hint(file.parent) if path.is_dir() else ''}".rstrip()) from None


def retie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with both names of the tied pair, whichever one it holds."""
    for have, missing in (TIED, TIED[::-1]):
        if missing not in state and have in state:
            state[missing] = state[have]
    return state


def safe_torch_load(path: Path | str, map_location="cpu"):
    """``torch.load(weights_only=True)``: tensors, containers and plain values only.

    A file that needs arbitrary Python objects unpickled (which can run code) is refused with a
    ``ValueError`` that names the offending object and says what to do instead; a file that is not a
    torch file at all (truncated, overwritten) raises :class:`CheckpointError` saying so."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found is None:  # not a refused object: the bytes are not a pickle at all
            raise _unreadable(path, error) from None
        raise ValueError(
            f"refusing to load {path}: it needs unpickling arbitrary Python objects"
            f" ({found.group(1)}), which can run code, and ettin "
            f"only loads tensors, containers and plain values (torch.load(weights_only=True)). "
            f"Use a safetensors file or a state dict of plain tensors instead; if you trust the file, "
            f"convert it once yourself (torch.load(..., weights_only=False) in a separate script, then "
            f"save just the tensors with safetensors or torch.save) and load the converted file."
        ) from None
    except FileNotFoundError:
        raise
    except Exception as error:  # the bytes are not a torch file: torch raises many kinds here
        raise _unreadable(path, error) from None


def _unreadable(path: Path | str, error: BaseException) -> CheckpointError:
    path = Path(path)
    hint = _fallback_hint(path.parent) if (path.parent / META).exists() else \
        "Use another copy of the file."
    found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(error))
    reason = found.group(1) if found else (str(error).strip().splitlines() or [type(error).__name__])[0]
    detail = f" ({reason.strip()[:160]})" if reason.strip() else ""
    return CheckpointError(f"{path} is not a readable torch file: it is truncated or corrupted"
                           f"{detail}. {hint}")


# ---------------------------------------------------------------------------------------------------
# The training's view: one object names, writes, keeps, verifies and resumes checkpoints.

KINDS = ("interval", "phase_end", "preemption")


@dataclass
class StartState:
    """Where a phase starts: weights, optimizer state, loader counters and RNG states (each None
    when starting afresh), and whether the Adam moments are fresh (zero)."""

    phase_index: int = 0
    model_state: Optional[dict] = None
    optimizer_state: Optional[dict] = None
    loader_state: Optional[dict] = None  # {step, samples, tokens} of the phase
    rng_states: Optional[list] = None
    fresh_optimizer: bool = True
    description: str = "from scratch"


@dataclass
class LoadedCheckpoint:
    path: Path
    meta: dict
    model_state: dict
    optimizer_state: dict
    rng_states: Optional[list] = field(default=None, repr=False)


class Checkpointer:
    """A run's checkpoints: ``<phase>-step<7 digits>-tok<15 digits>`` names, atomic writes with
    per-file sha256, retention, verified loading, and the state a run resumes from.

    Retention: phase ends are always kept; interval checkpoints (every ``checkpoint_every_tokens``)
    too when ``keep_interval`` (Ettin released all of them); of the other saves (preemption) the
    newest ``keep_last``. The newest checkpoint is never deleted."""

    def __init__(self, run_dir: Path | str, *, keep_interval: bool = True, keep_last: int = 3) -> None:
        self.run_dir = Path(run_dir)
        self.keep_interval = keep_interval
        self.keep_last = keep_last

    @staticmethod
    def name(phase: str, step: int, tokens: int) -> str:
        return f"{phase}-step{step:07d}-tok{tokens:015d}"

    def save(self, *, phase: str, phase_index: int, kind: str, loader_state: dict, model_state: dict,
             optimizer_state: dict, rng_states: list, config_yaml: str, meta: dict) -> Path:
        """Write one checkpoint (rank 0 only) and apply the retention policy."""
        if kind not in KINDS:
            raise ValueError(f"checkpoint kind {kind!r}; one of {', '.join(KINDS)}")
        step, tokens = int(loader_state["step"]), int(loader_state["tokens"])
        full_meta = {**meta, "phase": phase, "phase_index": phase_index, "kind": kind,
                     "phase_end": kind == "phase_end", "step": step, "tokens": tokens,
                     "loader_state": dict(loader_state)}

        def write(directory: Path) -> None:
            save_weights(model_state, directory)
            torch.save(optimizer_state, directory / "optimizer.pt")
            torch.save({"rng": rng_states}, directory / "rng.pt")
            (directory / "config.yaml").write_text(config_yaml)

        path = write_checkpoint(self.run_dir, self.name(phase, step, tokens), write, full_meta)
        prune_checkpoints(self.run_dir, keep_last=self.keep_last, keep=self._kept)
        return path

    def _kept(self, meta: dict) -> bool:
        kind = meta.get("kind", "phase_end" if meta.get("phase_end") else "interval")
        return kind == "phase_end" or (kind == "interval" and self.keep_interval)

    def list(self) -> list[Path]:
        return list_checkpoints(self.run_dir)

    def latest(self) -> Optional[Path]:
        return latest_checkpoint(self.run_dir)

    def load(self, path: Path | str, *, rng: bool = True) -> LoadedCheckpoint:
        """A checkpoint's contents, every file checked against its recorded sha256 first."""
        path = Path(path)
        if not is_complete(path):
            raise CheckpointError(f"{path} is not a complete ettin checkpoint (no {COMPLETE} or "
                                  f"{META}). {_fallback_hint(path)}")
        verify_checkpoint(path)
        return LoadedCheckpoint(
            path=path, meta=read_meta(path), model_state=load_weights(path),
            optimizer_state=safe_torch_load(path / "optimizer.pt"),
            rng_states=safe_torch_load(path / "rng.pt")["rng"] if rng else None,
        )

    def resume(self, path: Path | str, phases: list[str]) -> StartState:
        """The state to continue from ``path``: the same phase mid-way, or, from a phase end, the
        next phase (applied here, once: weights and optimizer moments carry over; token clock,
        schedule and data start afresh)."""
        meta = read_meta(path)
        if meta["phase"] not in phases:
            raise CheckpointError(
                f"checkpoint {path} is from phase {meta['phase']!r}, which this run does not include "
                f"({', '.join(phases)}); use another run_name, or init={path} to start from its weights"
            )
        index = phases.index(meta["phase"])
        loaded = self.load(path, rng=not meta.get("phase_end"))
        if meta.get("phase_end"):
            return StartState(phase_index=index + 1, model_state=loaded.model_state,
                              optimizer_state=loaded.optimizer_state, fresh_optimizer=False,
                              description=f"phase {meta['phase']!r} finished at {path}; next phase")
        return StartState(
            phase_index=index, model_state=loaded.model_state,
            optimizer_state=loaded.optimizer_state, loader_state=meta["loader_state"],
            rng_states=loaded.rng_states, fresh_optimizer=bool(meta.get("fresh_optimizer")),
            description=(f"resumed from {path} (phase {meta['phase']!r}, step {meta['step']}, "
                         f"{meta['tokens']:,} tokens)"),
        )


# ---------------------------------------------------------------------------------------------------
# One training process per run directory.


class RunLockedError(RuntimeError):
    """Another live process trains in this run directory."""


class RunLock:
    """``RUN_DIR/LOCK`` holds the PID, host and SLURM job of the process training in the run.

    A second process refuses to start, naming the holder. A lock whose process is gone (same host,
    PID not alive) or that belongs to this SLURM job (a requeue, possibly on another node) is taken
    over. Created with O_EXCL, so two processes starting at once cannot both get it."""

    def __init__(self, run_dir: Path | str) -> None:
        self.path = Path(run_dir) / "LOCK"
        self.held = False
        self.taken_over: Optional[dict] = None  # the stale holder this lock replaced, if any

    def _me(self) -> dict:
        import socket
        import time

        return {"pid": os.getpid(), "host": socket.gethostname(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.time()}

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = self._me()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or self._stale(holder, me):
                    if not (holder and holder.get("pid") == me["pid"]):
                        self.taken_over = holder or {"lock": "unreadable"}
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunLockedError(
                    f"{self.path.parent} is in use: process {holder['pid']} on {holder['host']}"
                    f"{' (SLURM job ' + holder['slurm_job_id'] + ')' if holder.get('slurm_job_id') else ''}"
                    f" is training in it. Wait for it to finish, stop it, or use another run_name; if "
                    f"that process is gone, delete {self.path}."
                )
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunLockedError(f"could not take {self.path}; delete it if no run uses {self.path.parent}")

    def _holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _stale(holder: dict, me: dict) -> bool:
        if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
            return True  # this process (a pair's second run, or a finished earlier call)
        if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
            return True  # the same SLURM job, requeued
        return holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1)))

    def release(self) -> None:
        if self.held and (self._holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
