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
import os
import sys
import time
from typing import Optional

from ettin.data.mds import MDSSplit, index_dir, load_or_build_index


def main(argv: Optional[list[str]] = None) -> int:
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
