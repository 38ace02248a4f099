"""Checkpoints on disk: written atomically, found by the token clock, pruned, loaded safely.

This is the filesystem layer only; what goes into a checkpoint is decided by the caller's
``write_fn``. A checkpoint is a directory ``RUN_DIR/checkpoints/<name>/`` holding whatever ``write_fn``
wrote (the trainer writes ``model.safetensors``, ``optimizer.pt``, ``rng.pt``, ``config.yaml``), the
caller's ``meta.json`` and, last, an empty ``COMPLETE`` marker.

Atomicity: everything, ``COMPLETE`` last, is written into a temporary folder beside the final one and
published with ``ettin.store.fs.publish`` (fsync, rename). A crash or kill at any point leaves either
no directory under the final name or a complete one, so the previous checkpoint stays the latest
usable one. What a crash left is cleaned by the next write (never what a live process is writing).
``meta.json`` records the sha256 of every file, verified on load.

Ordering: ``meta.json`` must hold ``tokens`` and ``step`` (the token clock and step AFTER the saved
step, counted from the start of the phase) and may hold ``phase_index`` (the phase's position in the
recipe; 0 when absent). Checkpoints are ordered by ``(phase_index, tokens, step)``: the token clock
restarts at each phase, so a later phase's first checkpoint is later than the previous phase's last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from ettin.store.fs import COMPLETE, clean_stale, is_complete, publish, temp_path

log = logging.getLogger(__name__)

META = "meta.json"
WEIGHTS = "model.safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


def checkpoints_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(phase: str, step: int, tokens: int) -> str:
    """Sorts by the token clock within a phase: ``<phase>-step<7 digits>-tok<15 digits>``."""
    return f"{phase}-step{step:07d}-tok{tokens:015d}"


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
    root.mkdir(parents=True, exist_ok=True)
    # A same-named checkpoint moved aside by a write that then crashed is put back if it is whole.
    clean_stale(root, restorable=is_complete)
    final = root / name
    temp = temp_path(final)
    temp.mkdir()
    try:
        write_fn(temp)
        for reserved in (META, COMPLETE):
            if (temp / reserved).exists():
                raise ValueError(f"write_fn must not write {reserved}; write_checkpoint writes it")
        meta = {**meta, "sha256": {str(f.relative_to(temp)): sha256_file(f)
                                   for f in sorted(temp.rglob("*")) if f.is_file()}}
        (temp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (temp / COMPLETE).write_text("")
        return publish(temp, final)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def read_meta(path: Path | str) -> dict:
    """The ``meta.json`` of a checkpoint directory."""
    return json.loads((Path(path) / META).read_text())


def checkpoint_identity(path: Path | str) -> dict:
    """What identifies a checkpoint's weights: its name, phase, step, tokens (in the phase) and the
    sha256 of its weights file recorded when it was written (None for checkpoints from before hashes).
    An export and every score made from the checkpoint carry it, so they can be checked against the
    run's checkpoints later (a run deleted and trained again reuses names, never weights)."""
    meta = read_meta(path)
    return {"name": Path(path).name, "phase": meta.get("phase"), "step": meta.get("step"),
            "tokens": meta.get("tokens"), "weights_sha256": meta.get("sha256", {}).get(WEIGHTS)}


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
            raise CheckpointError(f"{file} {problem}. {fallback_hint(path)}")


def fallback_hint(path: Path) -> str:
    listed = list_checkpoints(path.parent.parent)  # oldest first; only readable, complete ones
    earlier = listed[:listed.index(path)] if path in listed else listed
    if earlier:
        return (f"Resume from the previous complete checkpoint with resume={earlier[-1]} (or delete "
                f"{path} and rerun: resume=auto then takes the latest good one).")
    return "No earlier complete checkpoint exists in this run; start it again with another run_name."


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
                              f"{fallback_hint(file.parent) if path.is_dir() else ''}".rstrip()) from None


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
    hint = fallback_hint(path.parent) if (path.parent / META).exists() else \
        "Use another copy of the file."
    found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(error))
    reason = found.group(1) if found else (str(error).strip().splitlines() or [type(error).__name__])[0]
    detail = f" ({reason.strip()[:160]})" if reason.strip() else ""
    return CheckpointError(f"{path} is not a readable torch file: it is truncated or corrupted"
                           f"{detail}. {hint}")
