"""Check a prepared folder's shards byte for byte:

    python -m ettin.data.verify DIR

Every shard of ``DIR/train`` and ``DIR/validation`` is read whole and its sha256 compared with the
one preparation wrote into the split's index.json (mosaicml-streaming's ``hashes`` field), along with
the checks every run makes when it opens the folder (shard sizes, sample counts, lengths.npy). A run
checks the hashes itself at start, but only of shards this machine has not checked before at their
current size and modification time; this command reads them all again (after copying a folder, or
before a long campaign). Exit 0: every shard matches; 2: a damaged shard or a folder prepared
without hashes, named with the command to prepare it again.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from ettin.data.formats import PreparedSplit
from ettin.data.shards import SPLITS


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    started = time.perf_counter()
    hashed = shards = 0
    try:
        for split in SPLITS:
            prepared = PreparedSplit(args[0], split, check_hashes=False)
            unhashed = [s["file"].name for s in prepared.shards if not s["sha256"]]
            if unhashed:
                raise prepared.damaged(f"{prepared.root / split}: {len(unhashed)} shards have no "
                                       "sha256 (prepared by an older ettin), so they cannot be "
                                       "verified")
            hashed += prepared.verify_hashes(recheck=True)
            shards += len(prepared.shards)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print(f"{args[0]}: {shards} shards, {hashed:,} bytes, every sha256 matches its index "
          f"({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
