"""Replaying a released data order: the exact batches Ettin trained on.

Ettin's ``OptimizedDataSaver`` wrote every batch to zstd parquet files
``checkpoint_<k>/steps_<first>_to_<last>.parquet`` (released as ``jhu-clsp/ettin-data-order``:
``checkpoint_*`` for pre-training, ``ext_*`` and ``decay_*`` for the later phases, steps restarting
per phase), one row per sequence: ``input_ids`` (a list of uint16, padded to the batch's length with
[PAD]) and ``step``. A phase whose only source is ``{path: ..., format: order}`` trains on exactly
those batches: step s of the phase is the s-th step found in the files (from ``from_step`` on, to
continue a released checkpoint), its global batch is that step's rows (batch-size warmup included),
rank r takes its contiguous slice, and the rows lose their [PAD] tokens. ``path`` is a folder (its
parquet files, recursively) or a glob of folders or files (``.../ext_*``).

Planning a step needs only its row and token counts: they come from a one-time pass over each file,
cached per file (``$ETTIN_CACHE_DIR/order``, keyed by the file's path, size and time), so resuming
at any step is O(1) after that.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np

FILE_PATTERN = re.compile(r"steps_(\d+)_to_(\d+)\.parquet$")


def _natural(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path)))


class DataOrder:
    """The steps of a released data order (see the module docstring)."""

    def __init__(self, path: str, *, pad: Optional[int], from_step: Optional[int] = None,
                 cache_dir: Optional[str] = None) -> None:
        from ettin.data.mds import default_cache_dir

        self.path, self.pad = str(path), pad
        self.cache = Path(cache_dir) if cache_dir else default_cache_dir() / "order"
        self.files = self._find_files()
        per_file = [self._file_index(f) for f in self.files]
        self.steps = np.concatenate([p["steps"] for p in per_file])
        self.rows = np.concatenate([p["rows"] for p in per_file])
        self.tokens = np.concatenate([p["tokens"] for p in per_file])
        self.file_of = np.concatenate([np.full(len(p["steps"]), i) for i, p in enumerate(per_file)])
        self.row_start = np.concatenate([p["row_start"] for p in per_file])
        self.max_id = max(int(p["max_id"]) for p in per_file)
        self.sequence_length = max(int(p["sequence_length"]) for p in per_file)
        if (np.diff(self.steps) <= 0).any():
            raise ValueError(f"the data order {self.path} lists some step twice or out of order; "
                             "give the folders of one phase only (e.g. .../checkpoint_* or .../ext_*)")
        self.first = 0
        if from_step is not None:
            where = np.flatnonzero(self.steps == from_step)
            if not len(where):
                raise ValueError(f"the data order {self.path} has no step {from_step} (it holds "
                                 f"steps {int(self.steps[0])} to {int(self.steps[-1])})")
            self.first = int(where[0])
        self._table: tuple = (None, None)

    def _find_files(self) -> list[Path]:
        matches = sorted(glob.glob(self.path)) or [self.path]
        files = []
        for match in map(Path, matches):
            if match.is_dir():
                files += [f for f in match.rglob("*.parquet") if FILE_PATTERN.search(f.name)]
            elif match.is_file():
                files.append(match)
        if not files:
            raise FileNotFoundError(
                f"no steps_*_to_*.parquet files under {self.path}: give a folder of a released data "
                "order (jhu-clsp/ettin-data-order: checkpoint_* for pre-training, ext_*, decay_*)")
        return sorted(files, key=lambda f: (_natural(f.parent), int(FILE_PATTERN.search(f.name)[1])
                                            if FILE_PATTERN.search(f.name) else 0))

    def _file_index(self, file: Path) -> dict:
        """Per step of ``file``: its number, first row, rows and tokens (non-[PAD]); cached."""
        import pyarrow.parquet as pq

        stat = file.stat()
        key = hashlib.blake2b(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{self.pad}"
                              .encode(), digest_size=8).hexdigest()
        cached = self.cache / f"{key}.npz"
        if cached.is_file():
            with np.load(cached) as data:
                return dict(data)
        table = pq.read_table(file, columns=["input_ids", "step"])
        steps = table.column("step").to_numpy().astype(np.int64)
        lengths = self._lengths(table)
        change = np.flatnonzero(np.diff(steps)) + 1
        starts = np.concatenate(([0], change)).astype(np.int64)
        values = table.column("input_ids").combine_chunks().values.to_numpy()
        metadata = (table.schema.metadata or {}).get(b"sequence_length")
        index = {"steps": steps[starts], "row_start": starts,
                 "rows": np.diff(np.concatenate((starts, [len(steps)]))),
                 "tokens": np.add.reduceat(lengths, starts) if len(steps) else np.zeros(0, np.int64),
                 "max_id": np.int64(values.max() if len(values) else -1),
                 "sequence_length": np.int64(int(metadata) if metadata else int(lengths.max(initial=0)))}
        self.cache.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{cached.stem}.tmp-{os.getpid()}.npz")
        np.savez(partial, **index)
        os.replace(partial, cached)
        return index

    def _lengths(self, table) -> np.ndarray:
        column = table.column("input_ids").combine_chunks()
        offsets = column.offsets.to_numpy().astype(np.int64)
        if self.pad is None:
            return np.diff(offsets)
        real = np.concatenate(([0], np.cumsum(column.values.to_numpy() != self.pad)))
        return real[offsets[1:]] - real[offsets[:-1]]

    def __len__(self) -> int:
        """Steps from ``from_step`` on."""
        return len(self.steps) - self.first

    def step(self, step: int) -> tuple[int, int]:
        """(rows, tokens) of the phase's step ``step`` (0-based)."""
        entry = self._entry(step)
        return int(self.rows[entry]), int(self.tokens[entry])

    def _entry(self, step: int) -> int:
        entry = self.first + int(step)
        if entry >= len(self.steps):
            raise ValueError(f"the data order {self.path} ends after step {int(self.steps[-1])}: the "
                             f"phase needs more steps than were released; shorten the phase "
                             f"(phases.<phase>.tokens) or add the next folders")
        return entry

    def rows_of(self, step: int, begin: int = 0, end: Optional[int] = None) -> list[np.ndarray]:
        """Rows ``[begin, end)`` of the phase's step ``step``, without their [PAD] tokens."""
        import pyarrow.parquet as pq

        entry = self._entry(step)
        file = int(self.file_of[entry])
        if self._table[0] != file:  # one file (a few hundred steps) kept in memory
            self._table = (file, pq.read_table(self.files[file], columns=["input_ids"])
                           .column("input_ids").combine_chunks())
        column = self._table[1]
        start = int(self.row_start[entry])
        end = int(self.rows[entry]) if end is None else end
        part = column.slice(start + begin, end - begin)
        offsets = part.offsets.to_numpy().astype(np.int64)
        values = part.flatten().to_numpy().astype(np.int64)
        rows = np.split(values, offsets[1:-1] - offsets[0])
        return rows if self.pad is None else [row[row != self.pad] for row in rows]

    def check(self, vocab_size: int, seq_len: Optional[int] = None) -> None:
        if self.max_id >= vocab_size:
            raise ValueError(f"the data order {self.path} holds token id {self.max_id} but the "
                             f"training tokenizer has {vocab_size:,} ids: train with the tokenizer "
                             "Ettin used (answerdotai/ModernBERT-base)")
        if seq_len is not None and self.sequence_length > seq_len:
            raise ValueError(f"the data order {self.path} has rows of {self.sequence_length} tokens "
                             f"but the phase's sequence length is {seq_len}: set "
                             f"phases.<phase>.seq_len={self.sequence_length}")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_table": (None, None)}
