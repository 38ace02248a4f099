"""python -m ettin.merge: a weighted average of checkpoints of one shape (model merging, as mmBERT
and OLMo 2 merge their final checkpoints), written as an ettin checkpoint with its Hugging Face export.

    python -m ettin.merge CKPT_OR_RUN CKPT_OR_RUN ... --out DIR [--weights w1,w2,...]

``DIR`` becomes a run folder: ``DIR/checkpoints/<the first source's name>/`` holds the merged weights
(averaged in float64, stored in the sources' dtype), the first source's config, RNG states and data
counters, and fresh (empty) Adam moments: averaged moments would describe no trajectory. Its meta.json
records the sources and weights under ``merged_from``. It trains, resumes and exports like any
other checkpoint (``init=DIR``, or ``output_dir``/``run_name`` pointing at DIR to continue it);
``DIR/hf`` is its export, checked by reloading it with transformers (ettin.model.export).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from ettin.model.export import ExportError, export_checkpoint, resolve_checkpoint
from ettin.store.checkpoints import (CheckpointError, load_weights, read_meta, safe_torch_load,
                                     verify_checkpoint)
from ettin.store.fs import publishing, write_text
from ettin.store.rundir import RunDir
from ettin.train.checkpoint import Checkpointer

# What Checkpointer.save and write_checkpoint write themselves; the rest of the first source's meta
# (model config, objective, tokenizer, data identity, ...) describes the merge too.
WRITTEN_BY_SAVE = ("phase", "phase_index", "kind", "phase_end", "step", "tokens", "loader_state", "sha256")
EMBEDDINGS = "model.embeddings.tok_embeddings.weight"  # its rows are the vocabulary


class MergeError(ValueError):
    """The checkpoints cannot be averaged; the message names both sides and the fix."""


def merge_weights(states: Sequence[dict], weights: Sequence[float], names: Sequence[str]) -> dict:
    """The weighted mean of state dicts of the same keys and shapes (``weights`` sum to 1), computed
    in float64 and returned in the first state's dtypes."""
    first, first_name = states[0], names[0]
    for state, name in zip(states[1:], names[1:]):
        if set(state) != set(first):
            missing = sorted(set(first) ^ set(state))
            raise MergeError(f"{first_name} and {name} hold different tensors ({', '.join(missing[:4])}"
                             f"{', ...' if len(missing) > 4 else ''}): merge checkpoints of one model shape")
        vocabularies = first[EMBEDDINGS].shape[0], state[EMBEDDINGS].shape[0]
        if vocabularies[0] != vocabularies[1]:  # first: it also changes the head's shapes
            raise MergeError(f"different vocabularies: {first_name} has {vocabularies[0]} token "
                             f"embeddings, {name} has {vocabularies[1]}; merge checkpoints trained "
                             "with one tokenizer")
        for key, tensor in first.items():
            if state[key].shape != tensor.shape:
                raise MergeError(f"different shapes: {key} is {tuple(tensor.shape)} in {first_name} "
                                 f"but {tuple(state[key].shape)} in {name}; merge checkpoints of one "
                                 "model size")
    return {key: sum(w * state[key].double() for w, state in zip(weights, states)).to(tensor.dtype)
            for key, tensor in first.items()}


def normalized_weights(weights: Optional[Sequence[float]], count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise MergeError(f"--weights gives {len(weights)} weights for {count} checkpoints; give one each")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(f"--weights {list(weights)}: weights must be >= 0 with a positive sum")
    total = sum(weights)
    return [w / total for w in weights]


def merge(sources: Sequence[Path | str], out: Path | str, weights: Optional[Sequence[float]] = None,
          *, export: bool = True) -> Path:
    """Average ``sources`` (checkpoints or run folders: their latest checkpoint) into the run folder
    ``out``; returns the merged checkpoint. ``export``: also write and check ``out/hf``."""
    if len(sources) < 2:
        raise MergeError("give at least two checkpoints (or run folders) to merge")
    weights = normalized_weights(weights, len(sources))
    paths = [resolve_checkpoint(s) for s in sources]
    for path in paths:
        verify_checkpoint(path)
    names = [str(p) for p in paths]
    merged = merge_weights([load_weights(p) for p in paths], weights, names)

    first = paths[0]
    meta = read_meta(first)
    run = RunDir(out)
    if run.latest_checkpoint() is not None:
        raise MergeError(f"{out} already holds checkpoints; choose a new folder for the merge")
    # The run keeps its own tokenizer copy, so the merge stays usable if the sources are deleted.
    with publishing(run.tokenizer) as temp:
        shutil.copytree(meta["tokenizer"], temp)
    optimizer = safe_torch_load(first / "optimizer.pt")
    config_yaml = (first / "config.yaml").read_text()
    merged_meta = {key: value for key, value in meta.items() if key not in WRITTEN_BY_SAVE}
    merged_meta.update(
        tokenizer=str(run.tokenizer.resolve()), fresh_optimizer=True,
        merged_from=[{"path": str(Path(p).resolve()), "weight": w, "phase": read_meta(p)["phase"],
                      "step": read_meta(p)["step"], "tokens": read_meta(p)["tokens"]}
                     for p, w in zip(paths, weights)])
    checkpoint = Checkpointer(run.path).save(
        phase=meta["phase"], phase_index=meta["phase_index"], kind=meta["kind"],
        loader_state=meta["loader_state"], model_state=merged,
        # No moments (a fresh optimizer); the parameter groups keep their layout so it loads.
        optimizer_state={"state": {}, "param_groups": optimizer["param_groups"]},
        rng_states=safe_torch_load(first / "rng.pt")["rng"], config_yaml=config_yaml, meta=merged_meta)
    write_text(run.config, config_yaml)
    if export:
        export_checkpoint(checkpoint, run.export())
    return checkpoint


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ettin.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", metavar="CKPT_OR_RUN",
                        help="checkpoint folders, or run folders (their latest checkpoint)")
    parser.add_argument("--out", required=True, help="the run folder to write the merge into")
    parser.add_argument("--weights", help="comma-separated weights, one per source (default: uniform)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        print(f"error: --weights {args.weights!r}: give numbers separated by commas", file=sys.stderr)
        return 2
    try:
        checkpoint = merge(args.sources, args.out, weights)
    except (MergeError, ExportError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"merged checkpoint: {checkpoint}\nHugging Face folder: {RunDir(args.out).export()}")
    return 0
