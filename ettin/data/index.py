"""The one-time index pass over an MDS folder ettin did not prepare: every sample's length and first
token (what the loader plans with: the token clock, batch-size warmup, Ettin's [CLS] rule) and the
largest token id (checked against the tokenizer).

    python -m ettin.data.index PATH [--splits train,validation] [--column input_ids]
                                    [--cache-dir DIR] [--num-proc N]

PATH is a local folder or a remote (hf://, s3://, gs://, file://), as in ``data.<phase>``; every
index.json under it is indexed (ettin/data/mds.py says which belong to which split). Samples are
read with mosaicml-streaming's ``MDSReader``, shard by shard in ``num_proc`` processes (remote
shards are downloaded into the cache on the way). Each index is written next to its index.json
when that folder is writable, else into the cache folder, as ``ettin-index-<column>.{json,
lengths.npy,first.npy}`` (8 bytes per sample); it is keyed by that ``index.json``, so changed shards
are indexed again. Training runs the pass itself when the index is missing (rank 0 of each node builds
it under a file lock, the others wait), in one process: for large data run the command first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

from ettin.data.mds import MDSSplit


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
        samples, tokens = len(split), int(split.lengths.sum())
        pass_seconds = sum(m["seconds"] for m in split.index_meta)  # when the indexes were built
        rate = sum(m["tokens"] for m in split.index_meta) / max(pass_seconds, 1e-9) / max(args.num_proc, 1)
        held_out = {"train": " (without its held-out validation samples)",
                    "validation": " (held out of train)"}.get(split.held_out, "")
        print(f"{args.path} {name}{held_out}: {samples:,} samples, {tokens:,} tokens, largest id "
              f"{split.max_id}, {len(split.folders)} indexes (pass: {pass_seconds:.1f} s, "
              f"{rate:,.0f} tokens/s per process; this call {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
