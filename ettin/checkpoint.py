"""Checkpoints on disk: written atomically, found by token count, pruned, loaded safely.

A checkpoint is a directory ``RUN_DIR/checkpoints/<name>/`` holding ``model.safetensors`` (our key
names), ``optimizer.pt``, ``rng.pt``, ``config.yaml``, ``meta.json`` and, written last, ``COMPLETE``.
It is written into a temporary sibling directory and renamed into place, so a crash mid-save leaves
the previous checkpoints untouched and never a half-written one under a final name.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file

COMPLETE = "COMPLETE"
TEMP_PREFIX = ".tmp-"


def checkpoints_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(run_dir: Path | str, name: str, write_fn: Callable[[Path], None], meta: dict) -> Path:
    """Write a checkpoint atomically: ``write_fn`` fills a temporary directory, then it is renamed."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TEMP_PREFIX}*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / name
    temp = root / f"{TEMP_PREFIX}{name}-{os.getpid()}"
    temp.mkdir()
    write_fn(temp)
    (temp / "meta.json").write_text(json.dumps(meta, indent=2))
    (temp / COMPLETE).write_text("")
    for file in temp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(temp)
    if final.exists():  # the same step saved again (e.g. a phase end right after an interval save)
        shutil.rmtree(final)
    os.replace(temp, final)
    _fsync_dir(root)
    return final


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).exists() and (path / "meta.json").exists()


def read_meta(path: Path | str) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """Complete checkpoints of a run, oldest first: by phase (its index in the recipe), then tokens."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if not p.name.startswith(TEMP_PREFIX) and is_complete(p)]
    def order(path: Path) -> tuple:
        meta = read_meta(path)
        return meta.get("phase_index", 0), meta["tokens"], meta.get("phase_end", False)

    return sorted(found, key=order)


def latest_checkpoint(run_dir: Path | str) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path | str, keep_last: int, keep: Callable[[dict], bool]) -> None:
    """Delete all but the last ``keep_last`` checkpoints and those ``keep(meta)`` marks (phase ends)."""
    found = list_checkpoints(run_dir)
    for path in found[: max(len(found) - keep_last, 0)]:
        if not keep(read_meta(path)):
            shutil.rmtree(path)


def load_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint (safetensors: no code runs while loading)."""
    state = load_file(str(Path(path) / "model.safetensors"))
    if "decoder.weight" not in state:  # tied to the embeddings; safetensors stores it once
        state["decoder.weight"] = state["model.embeddings.tok_embeddings.weight"]
    return state


def safe_torch_load(path: Path | str):
    """``torch.load`` that never unpickles arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} needs unpickling arbitrary Python objects to load, which ettin refuses "
            f"(it could run code). Convert it to tensors-only (safetensors, or a state dict of "
            f"tensors and plain values) and load that instead. Details: {error}"
        ) from None
