"""python -m ettin.merge: a weighted average of checkpoints of one shape (model merging, as mmBERT
and OLMo 2 merge their final checkpoints), written as an ettin checkpoint with its Hugging Face export.

    python -m ettin.merge CKPT_OR_RUN CKPT_OR_RUN ... --out DIR [--weights w1,w2,...]

``DIR`` becomes a run folder: ``DIR/checkpoints/<the first source's name>/`` holds the merged weights
(averaged in float64, stored in the sources' dtype), the first source's config, RNG states and data
counters, and fresh (empty) Adam moments: averaged moments would describe no trajectory. Its meta.json
records the sources and weights under ``merged_from``. It trains, resumes and exports like any
other checkpoint (``init=DIR``, or ``output_dir``/``run_name`` pointing at DIR to continue it);
``DIR/hf`` is its export, checked by reloading it with transformers (ettin.model.export).

Refused, with one ``error:`` line and nothing written: sources of different shapes or vocabularies,
of different tokenizers (their fingerprints), of different objectives (MLM and CLM average into no
model; ``--mixed-objectives`` merges them anyway, exported as the first source's objective and said
so), weights that are not finite (any source tensor), and merge weights that are not finite,
negative or sum to zero. The checkpoint and its export are built aside and published only after the
export's check passes, so a failed merge leaves nothing that refuses the corrected retry.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from ettin.model.export import ExportError, export_checkpoint, resolve_checkpoint
from ettin.store.checkpoints import (CheckpointError, checkpoints_dir, load_weights, read_meta,
                                     safe_torch_load, verify_checkpoint)
from ettin.store.fs import publish, publishing, temp_path, write_text
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
    if not all(math.isfinite(w) for w in weights) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(f"--weights {','.join(map(str, weights))}: weights must be finite numbers "
                         ">= 0 with a positive sum")
    total = sum(weights)
    return [w / total for w in weights]


def check_mergeable(paths: Sequence[Path], metas: Sequence[dict], mixed_objectives: bool) -> None:
    """Sources of one tokenizer and (unless ``mixed_objectives``) one objective."""
    from ettin.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    fingerprints = [tokenizer_fingerprint(load_tokenizer(m["tokenizer"])) for m in metas]
    for path, meta, fingerprint in zip(paths[1:], metas[1:], fingerprints[1:]):
        if fingerprint != fingerprints[0]:
            raise MergeError(f"different tokenizers: {paths[0]} was trained with {metas[0]['tokenizer']} "
                             f"and {path} with {meta['tokenizer']} (their fingerprints differ, so one "
                             "id means another token); merge checkpoints trained with one tokenizer")
        if meta["objective"] != metas[0]["objective"] and not mixed_objectives:
            raise MergeError(f"different objectives: {paths[0]} is {metas[0]['objective']}, {path} is "
                             f"{meta['objective']}; merge checkpoints of one objective, or add "
                             "--mixed-objectives to average them anyway (exported as "
                             f"{metas[0]['objective']}, the first source's)")


def check_finite(state: dict, name: str) -> None:
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise MergeError(f"{name} holds non-finite weights (nan or inf in {key}); merge "
                             "checkpoints saved before the weights diverged")


def merge(sources: Sequence[Path | str], out: Path | str, weights: Optional[Sequence[float]] = None,
          *, export: bool = True, mixed_objectives: bool = False) -> Path:
    """Average ``sources`` (checkpoints or run folders: their latest checkpoint) into the run folder
    ``out``; returns the merged checkpoint. ``export``: also write and check ``out/hf`` (the
    checkpoint is published only once that check passed). ``mixed_objectives``: sources of different
    objectives may be averaged (the merge is the first source's objective)."""
    if len(sources) < 2:
        raise MergeError("give at least two checkpoints (or run folders) to merge")
    weights = normalized_weights(weights, len(sources))
    paths = [resolve_checkpoint(s) for s in sources]
    for path in paths:
        verify_checkpoint(path)
    names = [str(p) for p in paths]
    metas = [read_meta(p) for p in paths]
    check_mergeable(paths, metas, mixed_objectives)
    states = [load_weights(p) for p in paths]
    for state, name in zip(states, names):
        check_finite(state, name)
    merged = merge_weights(states, weights, names)  # finite: a mean of finite numbers

    run = RunDir(out)
    if run.latest_checkpoint() is not None:
        raise MergeError(f"{out} already holds checkpoints; choose a new folder for the merge")
    created = [p for p in (run.path, run.tokenizer) if not p.exists()]  # removed if the merge fails
    try:
        checkpoint = _write_merge(run, paths, metas, weights, merged, export)
    except BaseException:
        for path in reversed(created):
            shutil.rmtree(path, ignore_errors=True)
        raise
    return checkpoint


def _write_merge(run: RunDir, paths: Sequence[Path], metas: Sequence[dict], weights: Sequence[float],
                 merged: dict, export: bool) -> Path:
    first, meta = paths[0], metas[0]
    # The run keeps its own tokenizer copy, so the merge stays usable if the sources are deleted.
    with publishing(run.tokenizer) as temp:
        shutil.copytree(meta["tokenizer"], temp)
    optimizer = safe_torch_load(first / "optimizer.pt")
    config_yaml = (first / "config.yaml").read_text()
    merged_meta = {key: value for key, value in meta.items() if key not in WRITTEN_BY_SAVE}
    merged_meta.update(
        tokenizer=str(run.tokenizer.resolve()), fresh_optimizer=True,
        merged_from=[{"path": str(Path(p).resolve()), "weight": w, "phase": m["phase"],
                      "step": m["step"], "tokens": m["tokens"], "objective": m["objective"]}
                     for p, m, w in zip(paths, metas, weights)])
    # Built in a hidden staging run folder inside DIR (removed if anything fails, and by the next
    # attempt if this process dies); published once the export's check passed.
    staging = temp_path(run.path / "merge")
    try:
        staged = Checkpointer(staging).save(
            phase=meta["phase"], phase_index=meta["phase_index"], kind=meta["kind"],
            loader_state=meta["loader_state"], model_state=merged,
            # No moments (a fresh optimizer); the parameter groups keep their layout so it loads.
            optimizer_state={"state": {}, "param_groups": optimizer["param_groups"]},
            rng_states=safe_torch_load(first / "rng.pt")["rng"], config_yaml=config_yaml,
            meta=merged_meta)
        if export:
            export_checkpoint(staged, RunDir(staging).export())
        checkpoints_dir(run.path).mkdir(parents=True, exist_ok=True)
        checkpoint = publish(staged, checkpoints_dir(run.path) / staged.name)
        if export:
            publish(RunDir(staging).export(), run.export())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_text(run.config, config_yaml)
    return checkpoint


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ettin.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", metavar="CKPT_OR_RUN",
                        help="checkpoint folders, or run folders (their latest checkpoint)")
    parser.add_argument("--out", required=True, help="the run folder to write the merge into")
    parser.add_argument("--weights", help="comma-separated weights, one per source (default: uniform)")
    parser.add_argument("--mixed-objectives", action="store_true",
                        help="average sources of different objectives (exported as the first's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        print(f"error: --weights {args.weights!r}: give numbers separated by commas", file=sys.stderr)
        return 2
    try:
        checkpoint = merge(args.sources, args.out, weights, mixed_objectives=args.mixed_objectives)
    except (MergeError, ExportError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    objectives = [m["objective"] for m in read_meta(checkpoint)["merged_from"]]
    if len(set(objectives)) > 1:
        print(f"merged different objectives ({', '.join(objectives)}) as asked (--mixed-objectives); "
              f"the merge is a {objectives[0]} model")
    print(f"merged checkpoint: {checkpoint}\nHugging Face folder: {RunDir(args.out).export()}")
    return 0
