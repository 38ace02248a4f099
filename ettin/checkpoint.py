"""Checkpoints on disk: written atomically, found by the token clock, pruned, loaded safely.

This is the filesystem layer only; what goes into a checkpoint is decided by the caller's
``write_fn``. A checkpoint is a directory ``RUN_DIR/checkpoints/<name>/`` holding whatever ``write_fn``
wrote (the trainer writes ``model.safetensors``, ``optimizer.pt``, ``rng.pt``, ``config.yaml``), the
caller's ``meta.json`` and, last, an empty ``COMPLETE`` marker.

Atomicity: everything is written into ``RUN_DIR/checkpoints/.tmp-<name>-<pid>/``; every file and
directory in it is fsynced, then ``COMPLETE`` is written and fsynced, the directory is renamed to its
final name and the parent directory is fsynced. A crash or kill at any point leaves either no
directory under the final name or a complete one, so the previous checkpoint stays the latest
usable one. Temporary directories left by a crash are deleted by the next write.

Ordering: ``meta.json`` must hold ``tokens`` and ``step`` (the token clock and step AFTER the saved
step, counted from the start of the phase) and may hold ``phase_index`` (the phase's position in the
recipe; 0 when absent). Checkpoints are ordered by ``(phase_index, tokens, step)``: the token clock
restarts at each phase, so a later phase's first checkpoint is later than the previous phase's last.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
META = "meta.json"
WEIGHTS = "model.safetensors"
TEMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


def checkpoint_name(step: int, tokens: int, prefix: str = "") -> str:
    """``[prefix-]step-0000123-tok-0000000123456``: zero-padded (13 token digits: up to 9.99T) so names
    sort like the token clock within a phase."""
    return f"{prefix + '-' if prefix else ''}step-{step:07d}-tok-{tokens:013d}"


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
    return retie(load_file(str(file)))


def retie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with both names of the tied pair, whichever one it holds."""
    for have, missing in (TIED, TIED[::-1]):
        if missing not in state and have in state:
            state[missing] = state[have]
    return state


def safe_torch_load(path: Path | str, map_location="cpu"):
    """``torch.load(weights_only=True)``: tensors, containers and plain values only.

    A file that needs arbitrary Python objects unpickled (which can run code) is refused with a
    ``ValueError`` that names the offending object and says what to do instead."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise ValueError(
            f"refusing to load {path}: it needs unpickling arbitrary Python objects"
            f"{' (' + found.group(1) + ')' if found else ''}, which can run code, and ettin "
            f"only loads tensors, containers and plain values (torch.load(weights_only=True)). "
            f"Use a safetensors file or a state dict of plain tensors instead; if you trust the file, "
            f"convert it once yourself (torch.load(..., weights_only=False) in a separate script, then "
            f"save just the tensors with safetensors or torch.save) and load the converted file."
        ) from None
