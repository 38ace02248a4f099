"""One entry of a phase's data (``data.<phase>: [{path: ..., weight: ...}]`` in a recipe).

Its own module, free of the config system, so the loader and the benchmarks use it without Hydra."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataSource:
    path: str = "???"  # a prepared folder (python -m ettin.data.prepare), "builtin", an MDS folder or remote
    weight: float = 1.0
    format: str = "auto"  # auto | prepared | mds | order (docs/data.md; ettin/data/formats.py source_format)
    column: str = "input_ids"  # mds: the token id column
    cache_dir: Optional[str] = None  # mds: cache of remote / compressed shards ($ETTIN_CACHE_DIR)
    cache_limit_gb: float = 0.0  # mds: cache size limit (0: none)
    from_step: Optional[int] = None  # order: the first released step to replay (counted across its folders, from 1)
    from_folder: Optional[str] = None  # order: the folder to start at (e.g. checkpoint_000043: what came after a released revision)
    order_batches: str = "schedule"  # order: rows grouped by this run's batch schedule, or "released" (the released steps)
