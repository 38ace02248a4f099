"""Replaying Ettin's released data order (``jhu-clsp/ettin-data-order``), as it is published.

The release is parquet files ``<folder>/steps_<a>_to_<b>.parquet``, one folder per checkpoint interval:
``checkpoint_*`` (pre-training), ``ext_*`` (extension), ``decay_*`` (decay). Step numbers start again
at 1 in every folder. A row is one sequence: ``input_ids`` (padded with [PAD]) and ``step``.

What the release pins down, and so what a replay reproduces exactly:

* the rows, in their order: folders in order (``checkpoint_*``, then ``ext_*``, then ``decay_*``,
  each by its number), files by their first step, steps in order within a folder, rows as stored;
  [PAD] tokens are dropped;
* the data between two of Ettin's checkpoints: one folder. At every folder boundary the tokens the run
  has consumed (its token clock, kept across resumes) are checked against the released folders' totals.

What it does not: the grouping of rows into Ettin's batches. The card says that, because of batch-size
warmup, the released ``step`` numbers do not match any model's batches. So by default the rows are
grouped into THIS run's batches, by this run's own batch schedule (``global_batch``, batch-size warmup,
in tokens): a step takes the next ``global_batch_at(tokens)`` rows. ``order_batches: released`` groups
them by the released ``step`` numbers instead (a step is one released step's rows).

Positions: row r is the r-th row from ``from_step`` on (a released step counted across the folders
given, from 1), or from the first row of ``from_folder``. A model revision (``step599525``) counts the
model's own steps, not these: continuing one goes by folder (``folder_after``, checked at start by
``check_continuation``). A run's ``LoaderState.samples`` is the number of rows consumed, so resuming
is O(1), also in the middle of a folder.

Nothing missing, as far as the names tell: every folder holds every step from 1 on (a file
``steps_<a>_to_<b>`` exactly steps a to b) and a phase's folders follow each other without a gap.

Planning needs only the rows' lengths: each file is read once to record them (non-[PAD] tokens per
row) and its steps, cached per file in ``$ETTIN_CACHE_DIR/order`` (keyed by the file's path, size and
modification time); a row read later must have the recorded length.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from pathlib import Path
from typing import Optional

import numpy as np

from ettin.store.fs import publishing, write_text

FILE_PATTERN = re.compile(r"steps_(\d+)_to_(\d+)\.parquet$")
# Ettin's phases, in training order: a folder's name says which phase it belongs to.
PHASE_PREFIXES = ("checkpoint", "ext", "decay")
FOLDER_PATTERN = re.compile(r"^(" + "|".join(PHASE_PREFIXES) + r")_(\d+)$")
GROUPINGS = ("schedule", "released")
INDEX_VERSION = 2


def _folder_key(folder: Path) -> tuple:
    match = FOLDER_PATTERN.match(folder.name)
    if match is None:
        raise ValueError(f"{folder} is not a folder of a released data order (checkpoint_<k>, "
                         "ext_<k> or decay_<k>): give the order's folders, e.g. "
                         ".../ettin-data-order/checkpoint_*")
    return PHASE_PREFIXES.index(match[1]), int(match[2])


class ReleasedOrder:
    """The rows of a released data order from ``from_step`` on (see the module docstring).

    ``pad``: the [PAD] id, dropped from every row (None: rows as stored)."""

    def __init__(self, path: str, *, pad: Optional[int], from_step: Optional[int] = None,
                 from_folder: Optional[str] = None, cache_dir: Optional[str] = None) -> None:
        from ettin.data.mds import default_cache_dir

        self.path, self.pad = str(path), pad
        self.cache = Path(cache_dir) if cache_dir else default_cache_dir() / "order"
        self.files = self._find_files()
        self.indexes = [self._file_index(f) for f in self.files]
        self.folders = sorted({f.parent for f in self.files}, key=_folder_key)
        self._check_steps()
        file_rows = np.array([i["rows"] for i in self.indexes], dtype=np.int64)
        self.file_starts = np.concatenate(([0], np.cumsum(file_rows)))  # first row of every file
        file_tokens = np.array([i["tokens"] for i in self.indexes], dtype=np.int64)
        self.file_token_starts = np.concatenate(([0], np.cumsum(file_tokens)))
        # Every released step across the folders: its first row and its rows.
        step_rows = [np.asarray(i["step_rows"], dtype=np.int64) for i in self.indexes]
        counts = np.concatenate(step_rows)
        self.step_starts = np.concatenate(([0], np.cumsum(counts)))[:-1]
        self.step_counts = counts
        self.max_id = max(int(i["max_id"]) for i in self.indexes)
        self.sequence_length = max(int(i["sequence_length"]) for i in self.indexes)
        self.first_row, self.first_step = 0, 0
        if from_step is not None and from_folder is not None:
            raise ValueError("give from_step or from_folder, not both")
        if from_folder is not None:
            names = [folder.name for folder in self.folders]
            if from_folder not in names:
                raise ValueError(f"the data order {self.path} has no folder {from_folder!r} (its "
                                 f"folders: {names[0]} to {names[-1]}): give one of them, or a path "
                                 "that holds it")
            first_file = next(i for i, f in enumerate(self.files) if f.parent.name == from_folder)
            from_step = 1 + sum(len(i["step_rows"]) for i in self.indexes[:first_file])
        if from_step is not None:
            if not 1 <= from_step <= len(counts):
                raise ValueError(f"the data order {self.path} has no step {from_step}: its folders "
                                 f"hold steps 1 to {len(counts)} (counted across the folders, in "
                                 "order)")
            self.first_step = from_step - 1
            self.first_row = int(self.step_starts[self.first_step])
        self._table: tuple = (None, None)

    # -- the files ---------------------------------------------------------------------------

    def _find_files(self) -> list[Path]:
        matches = sorted(glob.glob(self.path)) or [self.path]
        files = []
        for match in map(Path, matches):
            if match.is_dir():
                files += [f for f in match.rglob("*.parquet") if FILE_PATTERN.search(f.name)]
            elif match.is_file() and FILE_PATTERN.search(match.name):
                files.append(match)
        if not files:
            raise FileNotFoundError(
                f"no steps_*_to_*.parquet files under {self.path}: give a folder of a released data "
                "order (jhu-clsp/ettin-data-order: checkpoint_* for pre-training, ext_*, decay_*)")
        return sorted(files, key=lambda f: (_folder_key(f.parent),
                                            int(FILE_PATTERN.search(f.name)[1])))

    def _check_steps(self) -> None:
        """What the release's names promise, so that nothing missing goes unnoticed: within a
        folder, steps only go up and are every step from 1 on (a file ``steps_<a>_to_<b>`` holds
        exactly steps a to b, the next file starts at b + 1); the folders of a phase follow each
        other without a gap (checkpoint_000003 after checkpoint_000002)."""
        steps: dict = {}
        for file, index in zip(self.files, self.indexes):  # files are in folder order
            steps.setdefault(file.parent, []).extend(index["steps"])
        for folder, numbers in steps.items():
            if (np.diff(numbers) <= 0).any():
                raise ValueError(f"the released folder {folder} lists some step twice or out of "
                                 "order (its files overlap, or a file was copied into it): fetch "
                                 "that folder again")
        expected: dict = {}  # folder -> the first step its next file must hold
        for file, index in zip(self.files, self.indexes):
            first, last = map(int, FILE_PATTERN.search(file.name).groups())
            if first > expected.get(file.parent, 1):
                raise ValueError(f"the released folder {file.parent} has no file for steps "
                                 f"{expected.get(file.parent, 1)} to {first - 1} (a file is "
                                 "missing): fetch that folder again")
            held = set(index["steps"])
            if held != set(range(first, last + 1)):
                missing = sorted(set(range(first, last + 1)) - held)
                problem = f"lacks step {', '.join(map(str, missing[:5]))}" if missing else "holds others"
                raise ValueError(f"{file} should hold steps {first} to {last} but {problem}: fetch "
                                 "that file again")
            expected[file.parent] = last + 1
        keys = [_folder_key(folder) for folder in self.folders]
        for (phase, number), (next_phase, next_number), folder in zip(keys, keys[1:], self.folders[1:]):
            if next_phase == phase and next_number != number + 1:
                raise ValueError(f"the data order {self.path} has no folder "
                                 f"{PHASE_PREFIXES[phase]}_{number + 1:06d} before {folder.name} (a "
                                 "folder is missing): fetch it, or give only folders that follow "
                                 "each other")

    def _file_index(self, file: Path) -> dict:
        """Per row of ``file``: its tokens (non-[PAD]); per step: its number and rows; cached."""
        import pyarrow.parquet as pq

        stat = file.stat()
        key = hashlib.blake2b(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{self.pad}"
                              f"\0{INDEX_VERSION}".encode(), digest_size=8).hexdigest()
        meta_file, lengths_file = self.cache / f"{key}.json", self.cache / f"{key}.lengths.npy"
        if meta_file.is_file():
            index = json.loads(meta_file.read_text())
            index["lengths_file"] = str(lengths_file)
            return index
        table = pq.read_table(file, columns=["input_ids", "step"])
        steps = table.column("step").to_numpy().astype(np.int64)
        lengths = self._lengths(table.column("input_ids").combine_chunks())
        change = np.flatnonzero(np.diff(steps)) + 1
        starts = np.concatenate(([0], change)).astype(np.int64) if len(steps) else np.zeros(0, np.int64)
        values = table.column("input_ids").combine_chunks().values.to_numpy()
        metadata = (table.schema.metadata or {}).get(b"sequence_length")
        index = {"file": str(file), "rows": len(steps), "tokens": int(lengths.sum()),
                 "steps": steps[starts].tolist(),
                 "step_rows": np.diff(np.concatenate((starts, [len(steps)]))).tolist(),
                 "max_id": int(values.max()) if len(values) else -1,
                 "sequence_length": int(metadata) if metadata else int(lengths.max(initial=0))}
        self.cache.mkdir(parents=True, exist_ok=True)
        with publishing(lengths_file) as partial, open(partial, "wb") as out:
            np.save(out, lengths)
        write_text(meta_file, json.dumps(index))  # last: complete
        index["lengths_file"] = str(lengths_file)
        return index

    def _lengths(self, column) -> np.ndarray:
        offsets = column.offsets.to_numpy().astype(np.int64)
        if self.pad is None:
            return np.diff(offsets).astype(np.int32)
        real = np.concatenate(([0], np.cumsum(column.values.to_numpy() != self.pad)))
        return (real[offsets[1:]] - real[offsets[:-1]]).astype(np.int32)

    # -- rows from from_step on --------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Rows from ``from_step`` on."""
        return int(self.file_starts[-1]) - self.first_row

    @property
    def steps(self) -> int:
        """Released steps from ``from_step`` on."""
        return len(self.step_counts) - self.first_step

    def tokens_before(self, row: int) -> int:
        """Tokens of rows [0, ``row``) (rows counted from ``from_step``)."""
        return self._tokens_to(self.first_row + row) - self._tokens_to(self.first_row)

    def _tokens_to(self, absolute: int) -> int:
        file = int(np.searchsorted(self.file_starts, absolute, side="right")) - 1
        if file >= len(self.files):
            return int(self.file_token_starts[-1])
        inside = absolute - int(self.file_starts[file])
        return int(self.file_token_starts[file]) + int(self._file_lengths(file)[:inside].sum(dtype=np.int64))

    def _file_lengths(self, file: int) -> np.ndarray:
        return np.load(self.indexes[file]["lengths_file"], mmap_mode="r")

    def lengths(self, row: int, count: int) -> np.ndarray:
        """Tokens of rows [``row``, ``row + count``)."""
        out, absolute, end = [], self.first_row + row, self.first_row + row + count
        while absolute < end:
            file = int(np.searchsorted(self.file_starts, absolute, side="right")) - 1
            stop = min(end, int(self.file_starts[file + 1]))
            base = int(self.file_starts[file])
            out.append(np.asarray(self._file_lengths(file)[absolute - base:stop - base], np.int64))
            absolute = stop
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def read(self, row: int, count: int) -> list[np.ndarray]:
        """Rows [``row``, ``row + count``) without their [PAD] tokens, each checked against the
        length recorded when its file was indexed."""
        import pyarrow.parquet as pq

        rows, absolute, end = [], self.first_row + row, self.first_row + row + count
        while absolute < end:
            file = int(np.searchsorted(self.file_starts, absolute, side="right")) - 1
            if self._table[0] != file:  # one file (a hundred steps) kept in memory
                self._table = (file, pq.read_table(self.files[file], columns=["input_ids"])
                               .column("input_ids").combine_chunks())
            base, stop = int(self.file_starts[file]), min(end, int(self.file_starts[file + 1]))
            part = self._table[1].slice(absolute - base, stop - absolute)
            offsets = part.offsets.to_numpy().astype(np.int64)
            values = part.values.to_numpy()[offsets[0]:offsets[-1]].astype(np.int64)
            pieces = np.split(values, offsets[1:-1] - offsets[0])
            rows += pieces if self.pad is None else [p[p != self.pad] for p in pieces]
            absolute = stop
        expected = self.lengths(row, count)
        for i, (got, want) in enumerate(zip(rows, expected)):
            if len(got) != want:
                raise ValueError(f"row {row + i} of the data order {self.path} has {len(got)} tokens "
                                 f"but {want} when its file was indexed: the file changed; delete "
                                 f"{self.cache} and start again")
        return rows

    def released_step(self, step: int) -> tuple[int, int]:
        """(first row, rows) of the ``step``-th released step from ``from_step`` (0-based)."""
        entry = self.first_step + step
        return int(self.step_starts[entry]) - self.first_row, int(self.step_counts[entry])

    def folder_ends(self) -> list[tuple[str, int]]:
        """(folder, its last row + 1, counted from ``from_step``) of every folder that ends after
        ``from_step``."""
        last = {file.parent: i for i, file in enumerate(self.files)}  # files are in folder order
        ends = [(folder.name, int(self.file_starts[last[folder] + 1]) - self.first_row)
                for folder in self.folders]
        return [(name, end) for name, end in ends if end > 0]

    # -- checks --------------------------------------------------------------------------------

    def check(self, vocab_size: int, seq_len: Optional[int] = None) -> None:
        if self.max_id >= vocab_size:
            raise ValueError(f"the data order {self.path} holds token id {self.max_id} but the "
                             f"training tokenizer has {vocab_size:,} ids: train with the tokenizer "
                             "Ettin used (answerdotai/ModernBERT-base)")
        if seq_len is not None and self.sequence_length > seq_len:
            raise ValueError(f"the data order {self.path} has rows of {self.sequence_length} tokens "
                             f"but the phase's sequence length is {seq_len}: set "
                             f"phases.<phase>.seq_len={self.sequence_length}")

    def usable_tokens(self, world_size: int = 1, grouping: str = "schedule") -> int:
        """Tokens a phase can consume from ``from_step`` on. Grouped by this run's schedule, the last
        step takes the rows that are left; the last ``rows % world_size`` of them cannot be shared
        evenly by the ranks and are not trained on."""
        if grouping == "released":
            return self.tokens_before(self.rows)
        return self.tokens_before(self.rows - self.rows % world_size)

    def check_tokens(self, needed: int, world_size: int = 1, grouping: str = "schedule") -> None:
        """A phase of ``needed`` tokens must fit in what was released (refused before training)."""
        usable = self.usable_tokens(world_size, grouping)
        if needed > usable:
            start = f"from step {self.first_step + 1} " if self.first_step else ""
            spare = "" if grouping == "released" or not self.rows % world_size else (
                f"; its last {self.rows % world_size} rows cannot be shared by {world_size} ranks")
            raise ValueError(
                f"the phase needs {needed:,} tokens but the data order {self.path} holds "
                f"{usable:,} {start}({self.rows:,} rows in {len(self.folders)} folders{spare}): "
                f"shorten the phase (phases.<phase>.tokens={usable}) or add the next folders")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_table": (None, None)}


# ------------------------------------------------------------------------------------------------
# Continuing a released model: which folder holds the data that came after a model revision

REVISION_PATTERN = re.compile(r"^(step|ext|decay)(\d+)$")
REVISION_PHASES = {"step": "checkpoint", "ext": "ext", "decay": "decay"}  # revision -> folder prefix


def folder_after(revision: str, revisions: list[str], folders: list[str]) -> str:
    """The data-order folder holding the data Ettin trained on right after model revision
    ``revision``, given the model's released ``revisions`` and the order's ``folders`` (names).

    The card: each folder is the data between two consecutive checkpoints, its steps restarting at
    1; the revisions are named by the model's own step (``step599525``), which no folder's step
    counts. So the pairing goes by position: when a phase has as many revisions as folders, the k-th
    revision (by its number) ends the k-th folder and folder k + 1 (after the phase's last: the next
    phase's first) came next. Anything else cannot be established and raises ValueError saying why."""
    match = REVISION_PATTERN.match(revision)
    if match is None:
        raise ValueError(f"init_revision={revision} is not a released training revision (step<N>, "
                         "ext<N> or decay<N>): no folder of the data order is known to follow it")
    kind = match[1]
    same = sorted((r for r in revisions if (m := REVISION_PATTERN.match(r)) and m[1] == kind),
                  key=lambda r: int(REVISION_PATTERN.match(r)[2]))
    if revision not in same:
        raise ValueError(f"the model has no revision {revision} (its {kind}* revisions: "
                         f"{', '.join(same[:3])}{', ...' if len(same) > 3 else ''})")
    prefix = REVISION_PHASES[kind]
    phase_folders = sorted(f for f in folders if f.startswith(prefix + "_"))
    if len(phase_folders) != len(same) or (phase_folders and
                                           not phase_folders[0].endswith("_000001")):
        raise ValueError(
            f"which data came after {revision} cannot be established: the model has {len(same)} "
            f"{kind}* revisions but the data order given has {len(phase_folders)} {prefix}_* folders "
            f"(from {phase_folders[0] if phase_folders else 'none'}); the pairing counts on one "
            f"folder per revision: give all of the phase's folders ({prefix}_*)")
    position = same.index(revision) + 1
    if position < len(phase_folders):
        return phase_folders[position]
    following = PHASE_PREFIXES[PHASE_PREFIXES.index(prefix) + 1:]
    if not following:
        raise ValueError(f"{revision} is the model's last revision: no released data came after it")
    return f"{following[0]}_000001"


def hub_revisions(repo: str) -> list[str]:
    """The branches and tags of a hub model (its released revisions)."""
    from huggingface_hub import list_repo_refs

    refs = list_repo_refs(repo)
    return [ref.name for ref in (*refs.branches, *refs.tags)]


def check_continuation(init: str, revision: str, source, folders: list[str],
                       list_revisions=hub_revisions) -> None:
    """A phase that continues the released model ``init`` at ``revision`` on a data order must
    start at the folder that came after it (``source.from_folder``); refused with the reason when
    that folder is another, when ``from_step`` is used instead (a count no revision shares), or
    when the pairing cannot be established."""
    try:
        revisions = list_revisions(init)
    except Exception as error:  # offline, no such repository
        raise ValueError(f"which data came after {init} at {revision} cannot be established: "
                         f"listing its revisions failed ({type(error).__name__}: {error}); run "
                         "online (the hub lists them), or start from a local copy of the weights "
                         "(init=FOLDER, no init_revision) with the from_folder you checked") from None
    expected = folder_after(revision, revisions, folders)
    if source.from_step is not None:
        raise ValueError(f"from_step: {source.from_step} counts the data order's released steps, "
                         f"which restart at 1 in every folder; init_revision={revision} counts the "
                         f"model's steps: they do not pair. The data after {revision} starts at "
                         f"from_folder: {expected}")
    if source.from_folder != expected:
        raise ValueError(f"init_revision={revision}: the data that came after it is the folder "
                         f"{expected}, but the order starts at "
                         f"{source.from_folder or 'its first folder'}: set from_folder: {expected} "
                         "(and give the path that holds it)")
