"""Data sources and their on-disk formats: which format a source is (``FORMATS``, ``source_format``:
given, or detected from what the folder holds), the reader of each (``open_splits``: a split with
``len``, ``lengths``, ``tokens(i)``, ``mean_length``), the checks a phase's sources pass before
training (``check_sources``: the tokenizer, a released order's length) and Ettin's cut of a row at
the sequence length (``fit_row``).

* ``prepared`` (python -m ettin.data.prepare): ``PreparedSplit`` here;
* ``mds`` (any MDS folder of token ids, local or remote): ``MDSSplit`` in ettin/data/mds.py;
* ``order`` (a released data order, replayed as it was trained): ettin/data/released_order.py.

A new on-disk format is one more name in ``FORMATS``, its detection in ``source_format`` and its split
class opened in ``open_splits`` (beside ``MDSSplit``), with its options as fields of ``DataSource``
(ettin/data/source.py).

Shards are read by a small reader over the MDS files (memory-mapped, read-only): no shared memory,
no locks, nothing left behind by a crash, any number of jobs can read one folder at once, and no
CUDA anywhere. (mosaicml-streaming's StreamingDataset would bring a shared-memory registry, a fixed
world and its own order; its file format is kept.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ettin.data.prepare import prepare_command, require_prepared
from ettin.data.source import DataSource
from ettin.store.fs import is_complete

MAX_OPEN_SHARDS = 256  # memory maps kept open per process


# ------------------------------------------------------------------------------------------------
# Reading prepared folders


class PreparedSplit:
    """One split of a prepared folder: sample lengths (memory-mapped ``lengths.npy``) and a reader
    over its MDS shards (memory-mapped, read-only, opened lazily in the process that reads)."""

    def __init__(self, path: str | os.PathLike, split: str, check_hashes: bool = True) -> None:
        """``check_hashes``: check every shard's sha256 unless this machine already checked that
        file at its current size and modification time (``verify_hashes``)."""
        self.root = require_prepared(path)
        self.split = split
        self.summary = json.loads((self.root / "summary.json").read_text())
        self.max_seq_len = int(self.summary["settings"]["max_seq_len"])
        directory = self.root / split
        try:
            index = json.loads((directory / "index.json").read_text())
            self.lengths = np.load(directory / "lengths.npy", mmap_mode="r")
        except (OSError, ValueError) as error:
            raise self.damaged(f"{directory} cannot be read ({type(error).__name__}: {error})")
        self.shards: list[dict] = []
        for shard in index.get("shards", []):
            if shard.get("format") != "mds" or shard.get("compression") or shard.get("zip_data"):
                raise self.damaged(f"{directory}: shard {shard.get('raw_data', {}).get('basename')} "
                                   "is not an uncompressed MDS shard")
            names = shard["column_names"]
            if "input_ids" not in names:
                raise self.damaged(f"{directory}: the shards have no input_ids column")
            self.shards.append({
                "file": directory / shard["raw_data"]["basename"],
                "bytes": int(shard["raw_data"]["bytes"]),
                "samples": int(shard["samples"]),
                "columns": names, "encodings": shard["column_encodings"],
                "sizes": shard["column_sizes"],
                "sha256": (shard["raw_data"].get("hashes") or {}).get("sha256"),
            })
        self.starts = np.cumsum([0] + [s["samples"] for s in self.shards])
        if self.starts[-1] != len(self.lengths):
            raise self.damaged(f"{directory}: the shards hold {self.starts[-1]} samples but "
                               f"lengths.npy lists {len(self.lengths)}")
        for shard in self.shards:  # a truncated or missing shard fails here, not mid-training
            size = shard["file"].stat().st_size if shard["file"].exists() else None
            if size != shard["bytes"]:
                state = "is missing" if size is None else \
                    f"has {size:,} bytes instead of {shard['bytes']:,} (truncated or damaged)"
                raise self.damaged(f"shard {shard['file']} {state}")
        self._maps: OrderedDict = OrderedDict()
        if check_hashes:
            self.verify_hashes()

    def verify_hashes(self, recheck: bool = False) -> int:
        """Check every shard's sha256 against the index (MDSWriter wrote it at preparation): a shard
        whose bytes changed (token ids shifted, a bad copy) is refused with the command to prepare
        it again. A shard checked before on this machine is only compared by size and modification
        time (recorded in ``$ETTIN_CACHE_DIR/verified``), unless ``recheck``. Returns the bytes
        hashed; folders prepared before shards had hashes are not checked (a warning says so)."""
        from ettin.data.mds import default_cache_dir
        from ettin.store.fs import write_text

        unhashed = [s["file"].name for s in self.shards if not s["sha256"]]
        if unhashed:
            logging.getLogger("ettin").warning(
                "%s/%s: %d shards have no sha256 (prepared by an older ettin): their bytes are not "
                "checked; prepare the folder again to have them checked", self.root, self.split,
                len(unhashed))
        record = default_cache_dir() / "verified" / (
            hashlib.blake2b(str((self.root / self.split).resolve()).encode(), digest_size=8).hexdigest()
            + ".json")
        try:
            checked = {} if recheck else json.loads(record.read_text())
        except (OSError, ValueError):
            checked = {}
        hashed = 0
        for shard in self.shards:
            if not shard["sha256"]:
                continue
            stat = shard["file"].stat()
            seen = [stat.st_size, stat.st_mtime_ns, shard["sha256"]]
            if checked.get(shard["file"].name) == seen:
                continue
            digest = hashlib.sha256()
            with shard["file"].open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            hashed += stat.st_size
            if digest.hexdigest() != shard["sha256"]:
                raise self.damaged(f"shard {shard['file']} does not have the sha256 its index lists "
                                   "(its bytes changed after preparation: shifted or corrupt token "
                                   "ids)")
            checked[shard["file"].name] = seen
        if hashed:
            write_text(record, json.dumps(checked) + "\n")
        return hashed

    def damaged(self, problem: str) -> ValueError:
        settings = self.summary.get("settings", {}) if hasattr(self, "summary") else {}
        tokenizer = self.summary.get("tokenizer", {}).get("source") if hasattr(self, "summary") else None
        command = prepare_command(self.root, settings.get("max_seq_len"), tokenizer).replace(
            "YOUR_TEXT", str(settings.get("input", "YOUR_TEXT")))
        return ValueError(f"{problem}. The prepared folder {self.root} is damaged: delete it and "
                          f"prepare it again: {command}")

    def __len__(self) -> int:
        return len(self.lengths)

    def mean_length(self, seq_len: int) -> float:
        """Mean sample length capped at ``seq_len`` (from the summary when nothing is capped)."""
        stats = self.summary.get("splits", {}).get(self.split, {})
        if seq_len >= self.max_seq_len and stats.get("chunks"):
            return stats["tokens"] / stats["chunks"]
        return float(np.minimum(np.asarray(self.lengths), seq_len).mean())

    def __getstate__(self) -> dict:  # DataLoader workers map the files themselves
        return {**self.__dict__, "_maps": OrderedDict()}

    def _map(self, shard: int) -> np.ndarray:
        data = self._maps.get(shard)
        if data is None:
            info = self.shards[shard]
            data = np.memmap(info["file"], dtype=np.uint8, mode="r")
            if len(data) < 4 or int(np.frombuffer(data, np.uint32, 1, 0)[0]) != info["samples"]:
                raise self.damaged(f"shard {info['file']} does not hold the {info['samples']} "
                                   "samples its index lists (corrupt header)")
            self._maps[shard] = data
            if len(self._maps) > MAX_OPEN_SHARDS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(shard)
        return data

    def tokens(self, index: int) -> np.ndarray:
        """The token ids of sample ``index`` (a read-only view into the shard)."""
        index = int(index)
        if not 0 <= index < len(self.lengths):
            raise IndexError(f"sample {index} of {self.root}/{self.split} (it has {len(self)})")
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        info = self.shards[shard]
        data = self._map(shard)
        local = index - int(self.starts[shard])
        begin, end = np.frombuffer(data, np.uint32, 2, 4 + 4 * local)
        expected = int(self.lengths[index])
        try:
            sample = memoryview(data)[int(begin):int(end)]
            if len(sample) != int(end) - int(begin) or end <= begin:
                raise ValueError("offsets outside the file")
            ids = _decode_input_ids(sample, info)
        except (ValueError, IndexError, KeyError) as error:
            raise self.damaged(f"sample {index} in {info['file']} cannot be decoded ({error})") from None
        if len(ids) != expected:
            raise self.damaged(f"sample {index} in {info['file']} has {len(ids)} tokens where "
                               f"lengths.npy says {expected} (corrupt shard)")
        return ids


_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "int32": np.int32, "int64": np.int64,
           "uint64": np.uint64, "uint8": np.uint8, "int16": np.int16}
_SHAPE_DTYPES = {0: np.uint8, 1: np.uint16, 2: np.uint32, 3: np.uint64}
_FIXED_SIZES = {"int": 8, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "int8": 1,
                "int16": 2, "int32": 4, "int64": 8, "float32": 4, "float64": 8}


def _decode_input_ids(sample: memoryview, info: dict) -> np.ndarray:
    """The input_ids column of one MDS sample (the layout MDSWriter writes: the byte counts of the
    variable-size columns, then each column in order)."""
    columns, encodings, sizes = info["columns"], info["encodings"], info["sizes"]
    variable = [i for i, s in enumerate(sizes) if s is None]
    head = np.frombuffer(sample, np.uint32, len(variable), 0)
    offset = 4 * len(variable)
    byte_sizes = []
    for i, size in enumerate(sizes):
        byte_sizes.append(int(head[variable.index(i)]) if size is None else int(size))
    position = columns.index("input_ids")
    start = offset + sum(byte_sizes[:position])
    datum = sample[start:start + byte_sizes[position]]
    encoding = encodings[position]
    if not encoding.startswith("ndarray:"):
        raise ValueError(f"input_ids is stored as {encoding}, not ndarray:<dtype>")
    dtype = _DTYPES[encoding.split(":")[1]]
    header = datum[0]
    ndim, shape_dtype = header >> 2, _SHAPE_DTYPES[header & 3]
    if ndim != 1:
        raise ValueError(f"input_ids has {ndim} dimensions")
    width = np.dtype(shape_dtype).itemsize
    (n,) = np.frombuffer(datum, shape_dtype, 1, 1)
    values = np.frombuffer(datum, dtype, int(n), 1 + width)
    return values


# ------------------------------------------------------------------------------------------------
# Sources: their format, their splits, their checks


FORMATS = ("auto", "prepared", "mds", "order")


def source_format(source: DataSource) -> str:
    """A source's ``format`` (``DataSource`` in ettin/data/source.py): ``prepared`` (python -m
    ettin.data.prepare), ``mds`` (any MDS folder of token ids, local or hf:// s3:// gs:// file://;
    ettin/data/mds.py), ``order`` (a released data order to replay;
    ettin/data/released_order.py); ``auto``:
    prepared if the folder has a COMPLETE marker, else mds if it has an MDS index or is remote."""
    if source.format != "auto":
        return source.format
    from ettin.data.mds import is_remote, looks_like_mds

    if not is_remote(source.path) and is_complete(source.path):
        return "prepared"
    return "mds" if looks_like_mds(source.path) else "prepared"


def normalize_sources(sources) -> list[DataSource]:
    """A folder, a list of folders, or a list of (folder, weight) / {path, weight, ...} / objects
    with those attributes -> [DataSource]."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    fields = {f.name for f in dataclass_fields(DataSource)}
    out = []
    for source in sources:
        if isinstance(source, DataSource):
            out.append(source)
        elif isinstance(source, (str, os.PathLike)):
            out.append(DataSource(str(source)))
        elif isinstance(source, dict):
            out.append(DataSource(**{k: v for k, v in source.items() if k in fields}))
        elif hasattr(source, "path"):
            out.append(DataSource(**{k: getattr(source, k) for k in fields if hasattr(source, k)}))
        else:
            path, weight = source
            out.append(DataSource(str(path), float(weight)))
    if not out:
        raise ValueError("no data sources given")
    for source in out:
        if not source.weight > 0:
            raise ValueError(f"source {source.path} has weight {source.weight}; weights must be "
                             "positive")
        if source.format not in FORMATS:
            raise ValueError(f"source {source.path} has format={source.format!r}; choose one of "
                             f"{', '.join(FORMATS)}")
    return [replace(s, path=str(s.path), weight=float(s.weight)) for s in out]


def fit_row(tokens: np.ndarray, seq_len: int, close_rows: bool, sep: Optional[int]) -> np.ndarray:
    """Ettin's cut of a row longer than the sequence length: keep ``seq_len`` tokens; an encoder row
    (closed with [SEP] by its collator) that then fills ``seq_len`` without ending in [SEP] keeps
    ``seq_len - 1``, so the closed row has ``seq_len``. Shorter rows are returned unchanged."""
    if len(tokens) > seq_len:
        tokens = tokens[:seq_len]
    if close_rows and len(tokens) >= seq_len and tokens[-1] != sep:
        tokens = tokens[:seq_len - 1]
    return tokens


def open_splits(sources, split: str, seq_len: int, truncate: bool = False,
                ids=None) -> list:
    """The ``split`` of every source, checked against the sequence length. Prepared folders longer
    than ``seq_len`` are refused (unless ``truncate``); MDS folders follow Ettin's rules (rows cut
    to ``seq_len``; [CLS] put in front of rows without it when ``ids`` is given)."""
    from ettin.data.mds import MDSSplit

    splits = []
    for source in normalize_sources(sources):
        kind = source_format(source)
        if kind == "order":
            raise ValueError(f"{source.path} is a data order (format=order): it replays the "
                             "released rows and cannot be mixed or read as a split")
        if kind == "mds":
            splits.append(MDSSplit(source.path, split, column=source.column,
                                   cache_dir=source.cache_dir, cache_limit_gb=source.cache_limit_gb,
                                   cls=None if ids is None else ids.cls))
            continue
        s = PreparedSplit(source.path, split)
        if s.max_seq_len > seq_len and not truncate:
            raise ValueError(
                f"{s.root} holds chunks of up to {s.max_seq_len} tokens but the sequence length is "
                f"{seq_len}: training would cut them. Prepare it for this length (ettin never "
                f"truncates silently): {prepare_command(str(s.root) + f'-{seq_len}', seq_len)}"
            )
        splits.append(s)
    return splits


def check_prepared_tokenizer(splits: Sequence, ids, fingerprint: Optional[str] = None,
                             vocab_size: Optional[int] = None) -> None:
    """The folders must have been prepared with the tokenizer the run uses: the same
    ``tokenizer_fingerprint`` when the caller knows it, else at least the same [CLS] and [SEP] ids.
    MDS folders hold no tokenizer: their largest id must be below ``vocab_size`` (the tokenizer's
    size), and rows that start with [CLS] or end with [SEP] must exist (else they were tokenized
    with other special ids)."""
    for split in splits:
        if not hasattr(split, "summary"):
            _check_mds_tokenizer(split, ids, vocab_size)
            continue
        fix = (f"prepare it again with the training tokenizer, or train with the tokenizer in "
               f"{split.root / 'tokenizer'}")
        stored = split.summary.get("settings", {}).get("tokenizer_fingerprint")
        if fingerprint is not None and stored is not None and stored != fingerprint:
            raise ValueError(f"{split.root} was prepared with another tokenizer than this run's: its token "
                             f"ids would be read as different tokens; {fix}")
        stored_ids = split.summary.get("tokenizer", {}).get("special_ids", {})
        for name in ("cls", "sep"):
            if name in stored_ids and stored_ids[name] != getattr(ids, name):
                raise ValueError(f"{split.root} was prepared with {name}={stored_ids[name]} but the "
                                 f"training tokenizer has {name}={getattr(ids, name)}: {fix}")


def check_sources(sources, seq_len: int, tokenizer, phase_tokens: Optional[int] = None,
                  world_size: int = 1) -> None:
    """Every source of a phase opens with ``tokenizer`` (what the loader will do, at start); a
    released data order must also hold the phase's ``phase_tokens`` (trained on ``world_size``
    ranks)."""
    from ettin.data.tokenizer import special_ids, tokenizer_fingerprint

    ids = special_ids(tokenizer)
    sources = normalize_sources(sources)
    orders = [s for s in sources if source_format(s) == "order"]
    if orders:
        if len(sources) > 1:
            raise ValueError("a data order (format=order) replays the training rows: it must be "
                             "the phase's only source")
        order = open_released_order(orders[0], ids)
        order.check(len(tokenizer), seq_len)
        if phase_tokens is not None:
            order.check_tokens(phase_tokens, world_size, orders[0].order_batches)
        return
    check_prepared_tokenizer(open_splits(sources, "train", seq_len, ids=ids), ids,
                             tokenizer_fingerprint(tokenizer), vocab_size=len(tokenizer))


def open_released_order(source: DataSource, ids):
    """The ``ReleasedOrder`` of a ``format: order`` source (its [PAD] tokens dropped)."""
    from ettin.data.released_order import GROUPINGS, ReleasedOrder

    if source.order_batches not in GROUPINGS:
        raise ValueError(f"source {source.path} has order_batches={source.order_batches!r}; choose "
                         f"{' or '.join(GROUPINGS)} (this run's batch schedule, or the released steps)")
    return ReleasedOrder(source.path, pad=None if ids is None else ids.pad,
                         from_step=source.from_step, from_folder=source.from_folder,
                         cache_dir=source.cache_dir)


def check_released_continuation(init: str, revision: str, sources, tokenizer) -> None:
    """A run that starts from a released model revision on a released data order must start at the
    folder that came after that revision (ettin/data/released_order.py check_continuation)."""
    from ettin.data.released_order import check_continuation
    from ettin.data.tokenizer import special_ids

    for source in normalize_sources(sources):
        if source_format(source) == "order":
            order = open_released_order(source, special_ids(tokenizer))
            check_continuation(init, revision, source, [f.name for f in order.folders])


def _check_mds_tokenizer(split, ids, vocab_size: Optional[int]) -> None:
    if not len(split):
        return
    if vocab_size is not None and split.max_id >= vocab_size:
        raise ValueError(
            f"{split.where} holds token id {split.max_id} but the training tokenizer has "
            f"{vocab_size:,} ids: the shards were tokenized with another tokenizer. Train with "
            "that tokenizer (tokenizer=..., e.g. answerdotai/ModernBERT-base for Ettin's data)")
    sample = np.asarray(split.first_ids[: 1 << 16])
    if ids is not None and not (sample == ids.cls).any():
        import logging

        logging.getLogger("ettin").warning(
            "none of the first %s rows of %s starts with the training tokenizer's [CLS] (%s): "
            "[CLS] is put in front of every row; if the shards were tokenized with other special "
            "ids, train with their tokenizer", f"{len(sample):,}", split.where, ids.cls)


def prepared_fingerprint(folder) -> Optional[str]:
    """What a run records of a prepared folder to prove later which data it saw: the sha256 of its
    summary.json (the settings that decide its content and its split sizes); None when absent."""
    summary = Path(folder) / "summary.json"
    return hashlib.sha256(summary.read_bytes()).hexdigest() if summary.is_file() else None
