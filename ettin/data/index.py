"""The one-time index pass over an MDS folder ettin did not prepare: every sample's length and first
token (what the loader plans with: the token clock, batch-size warmup, Ettin's [CLS] rule) and the
largest token id (checked against the tokenizer).

    python -m ettin.data.index PATH [--splits train,validation] [--column input_ids]
                                    [--cache-dir DIR] [--num-proc N]

PATH is a local folder or a remote (hf://, s3://, gs://, file://), as in ``data.<phase>``. Samples
are read with mosaicml-streaming's ``MDSReader``, shard by shard in ``num_proc`` processes (remote
shards are downloaded into the cache on the way). The index is written next to the split when that
folder is writable, else into the cache folder, as ``ettin-index-<column>.{json,lengths.npy,
first.npy}`` (8 bytes per sample); it is keyed by the split's ``index.json``, so changed shards are
indexed again. Training runs the pass itself when the index is missing (rank 0 of each node builds
it under a file lock, the others wait), in one process: for large data run the command first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ettin.data.files import file_lock, process_context

VERSION = 1


def index_dir(split) -> Path:
    """Next to the split when it can be written there, else the cache folder."""
    here = Path(split.stream.local) / split.split_dir
    if os.access(here, os.W_OK):
        return here
    from ettin.data.mds import _digest

    return split.cache / _digest(str(Path(split.stream.local).resolve())) / split.split_dir


def signature(split) -> str:
    """What the index depends on: the split's index.json and the column."""
    index = (Path(split.stream.local) / split.split_dir / "index.json").read_bytes()
    return hashlib.sha1(index + split.column.encode()).hexdigest()


def _index_shard(args) -> tuple[int, np.ndarray, np.ndarray, int]:
    split, shard = args
    split.ensure_shard(shard)
    reader = split.readers[shard]
    lengths = np.empty(reader.samples, np.uint32)
    first = np.zeros(reader.samples, np.uint32)
    largest = -1
    for i in range(reader.samples):
        ids = split.raw_tokens(shard, i)
        lengths[i] = len(ids)
        if len(ids):
            first[i] = ids[0]
            largest = max(largest, int(ids.max()))
    return shard, lengths, first, largest


def build_index(split, num_proc: int = 1, progress: bool = False) -> dict:
    """Index every shard of ``split`` (an ``MDSSplit``) and write the index files."""
    from tqdm import tqdm

    out = index_dir(split)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"ettin-index-{split.column}"
    total = int(split.starts[-1])
    started = time.perf_counter()
    partial = {kind: f"{stem}.{kind}.npy.tmp-{os.getpid()}" for kind in ("lengths", "first")}
    lengths = np.lib.format.open_memmap(partial["lengths"], "w+", np.uint32, (total,))
    first = np.lib.format.open_memmap(partial["first"], "w+", np.uint32, (total,))
    largest = -1
    jobs = [(split, shard) for shard in range(len(split.readers))]
    bar = tqdm(total=len(jobs), desc=f"indexing {split.where}", unit=" shards",
               disable=not progress, file=sys.stderr)
    if num_proc > 1 and len(jobs) > 1:
        with process_context(["ettin.data.mds", "streaming"]).Pool(num_proc) as pool:
            results = pool.imap_unordered(_index_shard, jobs)
            largest = _collect(results, split, lengths, first, bar)
    else:
        largest = _collect(map(_index_shard, jobs), split, lengths, first, bar)
    bar.close()
    lengths.flush(), first.flush()
    del lengths, first
    for kind, path in partial.items():
        os.replace(path, f"{stem}.{kind}.npy")
    seconds = time.perf_counter() - started
    meta = {"version": VERSION, "signature": signature(split), "column": split.column,
            "samples": total, "max_id": largest,
            "tokens": int(np.load(f"{stem}.lengths.npy", mmap_mode="r").sum(dtype=np.int64)),
            "seconds": round(seconds, 3), "num_proc": max(1, num_proc)}
    Path(f"{stem}.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(f"{stem}.json.tmp", f"{stem}.json")  # written last: the index is complete
    return meta


def _collect(results, split, lengths, first, bar) -> int:
    largest = -1
    for shard, shard_lengths, shard_first, shard_largest in results:
        begin, end = int(split.starts[shard]), int(split.starts[shard + 1])
        lengths[begin:end], first[begin:end] = shard_lengths, shard_first
        largest = max(largest, shard_largest)
        bar.update(1)
    return largest


def load_or_build_index(split, num_proc: Optional[int] = None) -> dict:
    """``{"lengths", "first"}`` (memory-mapped) and ``max_id`` of ``split``; built first when
    missing or stale (one process builds it, the others wait on the lock)."""
    stem = index_dir(split) / f"ettin-index-{split.column}"

    def current() -> Optional[dict]:
        try:
            meta = json.loads(Path(f"{stem}.json").read_text())
        except (OSError, ValueError):
            return None
        return meta if meta.get("version") == VERSION and meta.get("signature") == signature(split) \
            else None

    meta = current()
    if meta is None:
        with file_lock(Path(f"{stem}.lock")):
            meta = current()
            if meta is None:
                meta = build_index(split, num_proc=num_proc or 1)
    lengths = np.load(f"{stem}.lengths.npy", mmap_mode="r")
    first = np.load(f"{stem}.first.npy", mmap_mode="r")
    if len(lengths) != int(split.starts[-1]):
        raise ValueError(f"the index {stem}.lengths.npy of {split.where} lists {len(lengths)} "
                         f"samples, the shards {int(split.starts[-1])}: delete it and run "
                         f"python -m ettin.data.index {split.root}")
    return {"lengths": lengths, "first": first, "max_id": meta["max_id"], "meta": meta}


def main(argv: Optional[list[str]] = None) -> int:
    from ettin.data.mds import MDSSplit

    parser = argparse.ArgumentParser(prog="python -m ettin.data.index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--splits", default="train,validation")
    parser.add_argument("--column", default="input_ids")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    for name in args.splits.split(","):
        started = time.perf_counter()
        try:
            split = MDSSplit(args.path, name, column=args.column, cache_dir=args.cache_dir,
                             index_num_proc=args.num_proc)
        except (FileNotFoundError, ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if not split.readers:
            print(f"{args.path} {name}: no such split")
            continue
        meta = load_or_build_index(split)
        seconds = time.perf_counter() - started
        built = meta["meta"]
        rate = built["tokens"] / max(built["seconds"], 1e-9) / built["num_proc"]
        print(f"{args.path} {name}: {built['samples']:,} samples, {built['tokens']:,} tokens, "
              f"largest id {built['max_id']}; index {index_dir(split)} (pass: {built['seconds']} s "
              f"on {built['num_proc']} processes, {rate:,.0f} tokens/s per process; this call "
              f"{seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
