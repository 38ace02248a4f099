"""Training's view of checkpoints: what a checkpoint holds (weights, optimizer, RNG, resolved config,
meta), which are kept, and the state a run starts from (``StartState``). The files themselves are
``ettin.store.checkpoints``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ettin.store.fs import COMPLETE, is_complete
from ettin.store.checkpoints import (META, CheckpointError, fallback_hint, checkpoint_name,
                                     prune_checkpoints, read_meta, safe_torch_load, load_weights,
                                     save_weights, verify_checkpoint, write_checkpoint)
from ettin.store.rundir import RunDir
from ettin.train.step import NonFiniteLossError


KINDS = ("interval", "phase_end", "preemption")
# What a checkpoint folder holds, for the errors that meet something else where one was expected.
HOLDS = (f"model.safetensors, optimizer.pt, rng.pt, config.yaml, {META} and {COMPLETE} (written last), "
         "in RUN_DIR/checkpoints/<phase>-step<7 digits>-tok<15 digits>/")


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


def check_finite_weights(model_state: dict, what: str) -> None:
    """Raise NonFiniteLossError naming the first tensor of ``model_state`` holding NaN/inf (one host
    sync for all of them: a checkpoint is rare, a NaN checkpoint is lost work for whoever resumes)."""
    names = list(model_state)
    finite = torch.stack([torch.isfinite(t).all().cpu() for t in model_state.values()]).tolist() \
        if names else []
    bad = [name for name, ok in zip(names, finite) if not ok]
    if bad:
        raise NonFiniteLossError(f"the weights are not finite ({bad[0]}"
                                 f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''} hold "
                                 f"NaN/inf); {what} was not written.")


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists and tuples): what saving it needs."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class Checkpointer:
    """A run's checkpoints: ``<phase>-step<7 digits>-tok<15 digits>`` names, atomic writes with
    per-file sha256, retention, verified loading, and the state a run resumes from.

    Retention: phase ends are always kept; interval checkpoints (every ``checkpoint_every_tokens``)
    too when ``keep_interval`` (Ettin released all of them); of the other saves (preemption) the
    newest ``keep_last``. The newest checkpoint is never deleted."""

    def __init__(self, run_dir: Path | str, *, keep_interval: bool = True, keep_last: int = 3) -> None:
        self.run_dir = RunDir(run_dir)
        self.keep_interval = keep_interval
        self.keep_last = keep_last

    def save(self, *, phase: str, phase_index: int, kind: str, loader_state: dict, model_state: dict,
             optimizer_state: dict, rng_states: list, config_yaml: str, meta: dict) -> Path:
        """Write one checkpoint (rank 0 only) and apply the retention policy. Weights that are not
        all finite are refused (NonFiniteLossError) before anything is written."""
        if kind not in KINDS:
            raise ValueError(f"checkpoint kind {kind!r}; one of {', '.join(KINDS)}")
        check_finite_weights(model_state, f"the {kind} checkpoint of phase {phase} at step "
                             f"{loader_state['step']}")
        step, tokens = int(loader_state["step"]), int(loader_state["tokens"])
        full_meta = {**meta, "phase": phase, "phase_index": phase_index, "kind": kind,
                     "phase_end": kind == "phase_end", "step": step, "tokens": tokens,
                     "loader_state": dict(loader_state)}

        name = checkpoint_name(phase, step, tokens)

        def write(directory: Path) -> None:
            for file, needs, save in (
                ("model.safetensors", tensor_bytes(model_state), lambda: save_weights(model_state, directory)),
                ("optimizer.pt", tensor_bytes(optimizer_state),
                 lambda: torch.save(optimizer_state, directory / "optimizer.pt")),
                ("rng.pt", tensor_bytes(rng_states), lambda: torch.save({"rng": rng_states}, directory / "rng.pt")),
                ("config.yaml", len(config_yaml.encode()), lambda: (directory / "config.yaml").write_text(config_yaml)),
            ):
                try:
                    save()
                except (OSError, RuntimeError) as error:  # torch.save: "enforce fail ... unexpected pos"
                    raise self._write_failed(self.run_dir.checkpoints / name / file, needs, directory,
                                             error) from None

        path = write_checkpoint(self.run_dir.path, name, write, full_meta)
        prune_checkpoints(self.run_dir.path, keep_last=self.keep_last, keep=self._kept)
        return path

    def _write_failed(self, file: Path, needs: int, directory: Path, error: Exception) -> CheckpointError:
        """The error of a checkpoint file that could not be written (a full disk, a quota): the file,
        the bytes it needed, the space left, and the checkpoint a resume still has."""
        import shutil

        free = shutil.disk_usage(directory).free
        latest = self.latest()
        return CheckpointError(
            f"writing {file} failed ({error}); it needs about {needs:,} bytes and {free:,} are free "
            f"on that filesystem. Nothing of this checkpoint was published; "
            + (f"the latest checkpoint {latest} is intact" if latest else "no earlier checkpoint exists")
            + ". Free space (or set output_dir to another filesystem) and run the same command again.")

    def _kept(self, meta: dict) -> bool:
        kind = meta.get("kind", "phase_end" if meta.get("phase_end") else "interval")
        return kind == "phase_end" or (kind == "interval" and self.keep_interval)

    def list(self) -> list[Path]:
        return self.run_dir.list_checkpoints()

    def latest(self) -> Optional[Path]:
        return self.run_dir.latest_checkpoint()

    def load(self, path: Path | str, *, rng: bool = True) -> LoadedCheckpoint:
        """A checkpoint's contents, every file checked against its recorded sha256 first."""
        path = Path(path)
        if not is_complete(path):
            raise CheckpointError(f"{path} is not a complete ettin checkpoint (no {COMPLETE} or "
                                  f"{META}). {fallback_hint(path)}")
        verify_checkpoint(path)
        return LoadedCheckpoint(
            path=path, meta=read_meta(path), model_state=load_weights(path),
            optimizer_state=safe_torch_load(path / "optimizer.pt"),
            rng_states=safe_torch_load(path / "rng.pt")["rng"] if rng else None,
        )

    @staticmethod
    def start_meta(path: Path) -> dict:
        """The meta of the checkpoint a run starts from, or an error naming ``path``, what it is and
        what a checkpoint folder holds."""
        if not path.exists():
            raise CheckpointError(f"resume={path}: no such file or folder. Give a checkpoint folder "
                                  f"(it holds {HOLDS}), or resume=auto for the run's latest.")
        if not is_complete(path):
            latest = RunDir(path).latest_checkpoint() if path.is_dir() else None
            hint = (f"; {path} is a run directory: its latest checkpoint is resume={latest}" if latest
                    else f". {fallback_hint(path)}" if path.parent.name == "checkpoints" else "")
            raise CheckpointError(f"resume={path} is not a complete checkpoint folder (one holds "
                                  f"{HOLDS}){hint}")
        try:
            meta = read_meta(path)
            int(meta["step"]), int(meta["tokens"]), str(meta["phase"]), dict(meta["loader_state"])
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"resume={path}: {path / META} is not a checkpoint's meta "
                                  f"({type(error).__name__}: {error}). {fallback_hint(path)}") from None
        return meta

    def resume(self, path: Path | str, phases: list[str]) -> StartState:
        """The state to continue from ``path``: the same phase mid-way, or, from a phase end, the
        next phase (applied here, once: weights and optimizer moments carry over; token clock,
        schedule and data start afresh)."""
        meta = self.start_meta(Path(path))
        if meta["phase"] not in phases:
            raise CheckpointError(
                f"checkpoint {path} is from phase {meta['phase']!r}, which this run does not include "
                f"({', '.join(phases)}); use another run_name, or init={path} to start from its weights"
            )
        index = phases.index(meta["phase"])
        loaded = self.load(path, rng=not meta.get("phase_end"))
        if meta.get("phase_end"):
            # No moments saved (a merge, ettin.train.merge): the next phase starts fresh.
            return StartState(phase_index=index + 1, model_state=loaded.model_state,
                              optimizer_state=loaded.optimizer_state,
                              fresh_optimizer=not loaded.optimizer_state.get("state"),
                              description=f"phase {meta['phase']!r} finished at {path}; next phase")
        return StartState(
            phase_index=index, model_state=loaded.model_state,
            optimizer_state=loaded.optimizer_state, loader_state=meta["loader_state"],
            rng_states=loaded.rng_states, fresh_optimizer=bool(meta.get("fresh_optimizer")),
            description=(f"resumed from {path} (phase {meta['phase']!r}, step {meta['step']}, "
                         f"{meta['tokens']:,} tokens)"),
        )


