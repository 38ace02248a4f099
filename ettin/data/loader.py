"""Deterministic, resumable, rank-aware batches: one optimizer step at a time.

The global order of samples is a function of (seed, phase, global position) only:

* one source: position p is sample ``perm_k(p mod N)`` of epoch ``k = p // N``, where ``perm_k`` is a
  pseudo-random permutation of [0, N) keyed by (seed, phase, k) -- a Feistel network with cycle
  walking, computed per position in O(1) memory, so resuming at sample 10^10 costs nothing;
* a mixture: positions come in blocks of ``MIX_BLOCK``; each block holds a fixed number of samples
  of every source (its weight, a share of TOKENS, turned into a share of samples with the source's
  mean sample length) in a keyed random order; each source walks through its own epochs as above
  (a small source repeats, a large one is partly used).

Step s takes the next ``global_batch_at(tokens)`` positions; rank r takes its contiguous slice and
cuts it into micro-batches. Hence the order does not depend on the number of workers (worker w
builds the steps s with (s - first step) % workers == w, and the DataLoader takes workers in turn)
nor on the world size (the same global batch is sliced differently), and resuming needs only the
counters ``LoaderState(step, samples, tokens)``: no batch is replayed. Token counts come from each
split's ``lengths.npy`` (memory-mapped), so every worker plans steps, and the batch-size warmup,
without reading samples.

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
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ettin.data.prepare import prepare_command, require_prepared
from ettin.store.fs import is_complete
from ettin.data.source import DataSource

log = logging.getLogger("ettin")

MIX_BLOCK = 1 << 20  # positions per mixture block: proportions are exact to 1 / MIX_BLOCK per block
MAX_OPEN_SHARDS = 256  # memory maps kept open per process


@dataclass
class LoaderState:
    """Global counters after ``step`` optimizer steps of a phase (the same on every rank)."""

    step: int = 0
    samples: int = 0  # global positions consumed
    tokens: int = 0  # tokens of those samples (sum of min(length, seq_len)), all ranks together
    # The rows delivered so far in the phase, observed (rows_digest): this rank's part while training,
    # all ranks' in a checkpoint; None when a checkpoint written before digests was resumed.
    data_digest: Optional[str] = "0" * 64


DIGEST_MODULUS = 1 << 256


def rows_digest(samples: Sequence[tuple[int, np.ndarray]], seq_len: int) -> str:
    """The digest of rows as delivered: the sum (mod 2**256) over rows of sha256(global position,
    the row's first ``seq_len - 1`` token ids). A sum, so ranks' parts add up to the same digest on
    any world size, and steps add up to the phase's; each term names its position, so another
    order is another digest. ``seq_len - 1`` tokens: what both runs of a pair read (an encoder's full
    row ends one token early, to fit its closing [SEP])."""
    total = 0
    for position, row in samples:
        kept = np.asarray(row[:seq_len - 1], dtype=np.int64)
        term = hashlib.sha256(np.array([position, len(kept)], dtype=np.int64).tobytes() + kept.tobytes())
        total += int.from_bytes(term.digest(), "big")
    return f"{total % DIGEST_MODULUS:064x}"


def add_digests(*digests: Optional[str]) -> Optional[str]:
    """Digests of disjoint rows added up (None if any is unknown)."""
    if any(d is None for d in digests):
        return None
    return f"{sum(int(d, 16) for d in digests) % DIGEST_MODULUS:064x}"


# ------------------------------------------------------------------------------------------------
# Keyed permutations


def _key(*parts) -> int:
    """A 64-bit key from any parts (str() of each)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def permute(x: np.ndarray, n: int, key: int, rounds: int = 6) -> np.ndarray:
    """``perm(x)`` for a pseudo-random permutation of [0, n) chosen by ``key``: a balanced Feistel
    network on the smallest even number of bits covering n, cycle-walking back into [0, n)."""
    x = np.asarray(x, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(x)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = [np.uint64(_key(key, r)) for r in range(rounds)]

    def once(y: np.ndarray) -> np.ndarray:
        left, right = y >> shift, y & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << shift) | right

    with np.errstate(over="ignore"):
        y = once(x)
        outside = y >= np.uint64(n)
        while outside.any():
            y[outside] = once(y[outside])
            outside = y >= np.uint64(n)
    return y


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
# Mixtures


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


class Mixture:
    """The global order over one or several prepared folders (see the module docstring).

    ``weights`` are shares of tokens (as the Ettin mixture tables give them), turned into shares of
    samples with each source's mean sample length (capped at ``seq_len``)."""

    def __init__(self, splits: Sequence[PreparedSplit], weights: Sequence[float], *, seed: int,
                 phase, seq_len: int) -> None:
        self.splits, self.seed, self.phase, self.seq_len = list(splits), int(seed), str(phase), seq_len
        for split in self.splits:
            if not len(split):
                raise ValueError(f"{split.root}/{split.split} holds no samples; prepare it from more "
                                 "text or leave it out of the mixture")
        self.sizes = np.array([len(s) for s in self.splits], dtype=np.int64)
        shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.token_shares = shares
        if len(self.splits) == 1:
            self.block_counts = np.array([MIX_BLOCK], dtype=np.int64)
        else:
            mean = np.array([s.mean_length(seq_len) for s in self.splits])
            sample_shares = shares / mean
            sample_shares /= sample_shares.sum()
            self.block_counts = _largest_remainder(sample_shares, MIX_BLOCK)
            if (self.block_counts == 0).any():
                small = [str(s.root) for s, c in zip(self.splits, self.block_counts) if c == 0]
                raise ValueError(f"sources {small} have weights too small to be sampled "
                                 f"(< 1 in {MIX_BLOCK:,} samples)")
        self.block_starts = np.concatenate(([0], np.cumsum(self.block_counts)))

    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample index) of each global position."""
        p = np.asarray(positions, dtype=np.int64)
        if len(self.splits) == 1:
            source = np.zeros(p.shape, dtype=np.int64)
            k = p
        else:
            block, offset = p // MIX_BLOCK, p % MIX_BLOCK
            slot = np.empty(p.shape, dtype=np.int64)
            for b in np.unique(block):
                here = block == b
                slot[here] = permute(offset[here], MIX_BLOCK,
                                     _key(self.seed, self.phase, "mix", int(b))).astype(np.int64)
            source = np.searchsorted(self.block_starts, slot, side="right") - 1
            k = block * self.block_counts[source] + (slot - self.block_starts[source])
        index = np.empty(p.shape, dtype=np.int64)
        for i in np.unique(source):
            here = source == i
            n = int(self.sizes[i])
            epoch, within = k[here] // n, k[here] % n
            out = np.empty(within.shape, dtype=np.int64)
            for e in np.unique(epoch):
                sel = epoch == e
                out[sel] = permute(within[sel], n, _key(self.seed, self.phase, "source", int(i),
                                                         "epoch", int(e))).astype(np.int64)
            index[here] = out
        return source, index

    def lengths(self, start: int, count: int) -> np.ndarray:
        """The lengths (capped at seq_len) of the samples at positions [start, start + count)."""
        source, index = self.locate(np.arange(start, start + count, dtype=np.int64))
        out = np.empty(count, dtype=np.int64)
        for i in np.unique(source):
            here = source == i
            out[here] = np.asarray(self.splits[i].lengths)[index[here]]
        return np.minimum(out, self.seq_len)

    def samples(self, start: int, count: int) -> list[tuple[int, np.ndarray]]:
        """(global position, tokens) for positions [start, start + count)."""
        positions = np.arange(start, start + count, dtype=np.int64)
        source, index = self.locate(positions)
        return [(int(p), self.splits[int(s)].tokens(int(i)))
                for p, s, i in zip(positions, source, index)]


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    raw = shares * total
    counts = np.floor(raw).astype(np.int64)
    rest = total - int(counts.sum())
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


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


# ------------------------------------------------------------------------------------------------
# Training batches


def pack_rows(lengths: Sequence[int], budget: int, groups: int = 1) -> list[int]:
    """Rows per micro-batch when consecutive rows of ``lengths`` tokens fill micro-batches of at most
    ``budget`` tokens (a row is never split); then the largest micro-batches are halved until there
    are ``groups`` of them (or every one holds a single row)."""
    sizes, used = [], 0
    for n in lengths:
        if sizes and used + n <= budget:
            sizes[-1] += 1
            used += n
        else:
            sizes.append(1)
            used = n
    while sizes and len(sizes) < groups and max(sizes) > 1:
        i = sizes.index(max(sizes))
        sizes[i:i + 1] = [sizes[i] // 2, sizes[i] - sizes[i] // 2]
    return sizes


@dataclass
class StepBatch:
    """This rank's part of one optimizer step, and what the step needs to know about it without
    asking the device (``count_on_host``, before the batch is copied to the device)."""

    micro_batches: list  # collated: the model's keyword arguments, one dict per micro-batch
    state: LoaderState  # the global counters after the step
    global_batch: int  # sequences in the step, all ranks
    step_tokens: int  # tokens in the step, all ranks
    targets: list[int] = field(default_factory=list)  # labelled positions per micro-batch
    # Per micro-batch, what each target group's loss is averaged over (an objective mix's members;
    # one group otherwise): its labelled positions, or the collator's ``loss_tokens`` (MDLM).
    group_targets: list[list[int]] = field(default_factory=list)
    row_lengths: list[list[int]] = field(default_factory=list)  # real tokens of each row
    rows: list[int] = field(default_factory=list)  # rows per micro-batch
    # Each row's attention direction per micro-batch (an objective mix); None: the model's own.
    row_causal: list[Optional[list[bool]]] = field(default_factory=list)
    # Each row's prefix length per micro-batch (PrefixLM); None: no prefixes.
    row_prefix: list[Optional[list[int]]] = field(default_factory=list)
    rows_digest: str = "0" * 64  # of this rank's rows in the step (made on the host, by the loader)

    def count_on_host(self) -> "StepBatch":
        self.targets = [int((mb["labels"] != -100).sum()) for mb in self.micro_batches]
        self.group_targets = [list(mb.get("loss_tokens", mb.get("target_groups", [n])))
                              for mb, n in zip(self.micro_batches, self.targets)]
        self.row_lengths = [_row_lengths(mb) for mb in self.micro_batches]
        self.rows = [len(lengths) for lengths in self.row_lengths]
        self.row_causal = [_row_causal(mb, rows) for mb, rows in zip(self.micro_batches, self.rows)]
        self.row_prefix = [mb["prefix_lengths"].tolist() if "prefix_lengths" in mb else None
                           for mb in self.micro_batches]
        return self

    @property
    def tokens_before(self) -> int:
        """The phase's token clock when the step starts (what its LR is read at)."""
        return self.state.tokens - self.step_tokens

    def pin_memory(self) -> "StepBatch":  # the DataLoader pins what has this method
        # Tensors only: max_seqlen, target_groups, loss_tokens and a shared direction are host values.
        return replace(self, micro_batches=[{k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                                             for k, v in mb.items()}
                                            for mb in self.micro_batches])


def _row_causal(micro_batch: dict, rows: int) -> Optional[list[bool]]:
    causal = micro_batch.get("causal")
    if causal is None:
        return None
    return causal.tolist() if isinstance(causal, torch.Tensor) else [bool(causal)] * rows


def _row_lengths(micro_batch: dict) -> list[int]:
    if "cu_seqlens" in micro_batch:
        return torch.diff(micro_batch["cu_seqlens"]).tolist()
    mask = micro_batch.get("attention_mask")
    if mask is None:
        return [micro_batch["input_ids"].shape[1]] * micro_batch["input_ids"].shape[0]
    return mask.sum(dim=1).tolist()


class StepBatches(IterableDataset):
    """This rank's part of each optimizer step, from ``state`` on, forever, as ``StepBatch``es.

    ``sources``: a prepared folder or a list of (folder, weight). ``global_batch_at(tokens)`` gives
    the global batch in sequences after ``tokens`` tokens (batch-size warmup); it must be divisible
    by ``world_size``. ``truncate``: cut samples longer than ``seq_len`` instead of refusing the
    folder. ``pack``: micro-batches hold up to ``micro_batch_size * seq_len`` tokens of whole
    samples instead of ``micro_batch_size`` samples (unpadded collators only): fewer, fuller
    micro-batches when documents are short. Every rank of a step gets the same number of
    micro-batches (``pack_rows``), because a sharded model's forwards are collective."""

    def __init__(self, sources, *, split: str = "train", seq_len: int, collator: Callable,
                 global_batch_at: Callable[[int], int], micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, phase="0",
                 state: Optional[LoaderState] = None, truncate: bool = False,
                 pack: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if micro_batch_size < 1 or seq_len < 2:
            raise ValueError("micro_batch_size must be >= 1 and seq_len >= 2")
        if pack and not getattr(collator, "unpadded", True):
            raise ValueError("pack=True needs an unpadded collator (padded rows cannot keep "
                             "documents apart)")
        self.sources = normalize_sources(sources)
        ids = getattr(collator, "ids", None)
        self.order = None
        if source_format(self.sources[0]) == "order":  # replay a released data order
            if len(self.sources) > 1 or split != "train":
                raise ValueError("a data order (format=order) replays the training rows: it must "
                                 "be the phase's only source")
            self.order = open_released_order(self.sources[0], ids)
            self.order.check(getattr(collator, "vocab_size", None) or self.order.max_id + 1, seq_len)
            self.order_batches = self.sources[0].order_batches
            self.folder_ends = self.order.folder_ends()
        else:
            self.splits = open_splits(self.sources, split, seq_len, truncate, ids=ids)
            if ids is not None:
                check_prepared_tokenizer(self.splits, ids,
                                         vocab_size=getattr(collator, "vocab_size", None))
            self.mixture = Mixture(self.splits, [s.weight for s in self.sources], seed=seed,
                                   phase=phase, seq_len=seq_len)
        self.seq_len, self.truncate, self.pack = seq_len, truncate, pack
        self.close_rows = bool(getattr(collator, "close_rows", False))
        self.sep = None if ids is None else ids.sep
        self.collator = collator
        self.global_batch_at = global_batch_at
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.start = state if state is not None else LoaderState()
        self.global_batch(self.start)  # a bad batch size fails now, not in a worker

    def global_batch(self, state: LoaderState) -> int:
        """Sequences in the step that starts at ``state`` (all ranks); 0 once a released order is
        used up. A released order's last step takes the rows that are left (as many as the ranks
        can share evenly)."""
        if self.order is not None and self.order_batches == "released":
            if state.step >= self.order.steps:
                return 0
            batch = self.order.released_step(state.step)[1]
            what = (f"released step {self.order.first_step + state.step + 1} has {batch} rows, "
                    "which")
            fix = "; or group the rows by this run's schedule (order_batches: schedule)"
        else:
            batch = int(self.global_batch_at(state.tokens))
            what, fix = f"global batch {batch} (at {state.tokens:,} tokens)", ""
        if batch < 1 or batch % self.world_size:
            raise ValueError(
                f"{what} is not a positive multiple of the world size {self.world_size}: every "
                "rank must get the same number of sequences. Choose a global batch (and "
                f"batch-warmup sizes) divisible by the number of devices{fix}")
        if self.order is not None and self.order_batches == "schedule":
            left = self.order.rows - state.samples
            batch = min(batch, left - left % self.world_size)
        return batch

    def plan(self) -> Iterator[tuple[LoaderState, int, int]]:
        """(state before the step, global batch, step tokens) of every step from the start on;
        a released order ends when its rows are used up."""
        state = self.start
        while True:
            batch = self.global_batch(state)
            if batch == 0:
                return
            if self.order is None:
                step_tokens = int(self.mixture.lengths(state.samples, batch).sum())
            else:
                step_tokens = int(self.order.lengths(state.samples, batch).sum())
                self.check_folder_ends(state, batch)
            yield state, batch, step_tokens
            state = LoaderState(state.step + 1, state.samples + batch, state.tokens + step_tokens)

    def check_folder_ends(self, state: LoaderState, batch: int) -> None:
        """A released folder is the data between two of Ettin's checkpoints: where one ends inside
        this step, the run's token clock (kept across resumes) must have consumed exactly the
        released folders' tokens up to there."""
        for folder, end in self.folder_ends:
            if state.samples < end <= state.samples + batch:
                consumed = state.tokens + int(self.order.lengths(state.samples, end - state.samples).sum())
                released = self.order.tokens_before(end)
                if consumed != released:
                    raise ValueError(
                        f"at the end of the released folder {folder} (step {state.step + 1} of this "
                        f"phase) the run has consumed {consumed:,} tokens but the released folders "
                        f"up to it hold {released:,}: the run resumed from a checkpoint of another "
                        "data order (other folders or from_step); start the phase again")
                log.info("released folder %s ends in step %d: %s tokens, as released", folder,
                         state.step + 1, f"{consumed:,}")

    def rank_samples(self, state: LoaderState, batch: int) -> list[tuple[int, np.ndarray]]:
        share = batch // self.world_size
        first = state.samples + self.rank * share
        if self.order is not None:
            samples = list(zip(range(first, first + share), self.order.read(first, share)))
        else:
            samples = self.mixture.samples(first, share)
        return [(p, fit_row(t, self.seq_len, self.close_rows, self.sep)) for p, t in samples]

    def micro_batches(self, state: LoaderState, batch: int, samples: list) -> list[list]:
        if not self.pack:
            m = self.micro_batch_size
            return [samples[i:i + m] for i in range(0, len(samples), m)]
        # Every rank packs every rank's share from the lengths alone (no communication) and splits
        # its own into as many micro-batches as the rank that needs the most.
        lengths = (self.mixture if self.order is None else self.order).lengths(state.samples, batch)
        budget, share = self.micro_batch_size * self.seq_len, batch // self.world_size
        most = max(len(pack_rows(lengths[r * share:(r + 1) * share], budget))
                   for r in range(self.world_size))
        sizes = pack_rows(lengths[self.rank * share:(self.rank + 1) * share], budget, groups=most)
        bounds = np.cumsum([0, *sizes])
        return [samples[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for state, batch, step_tokens in self.plan():
            if (state.step - self.start.step) % workers != worker:
                continue
            samples = self.rank_samples(state, batch)
            # The collator of this step: a scheduled rate (mask-rate annealing) is read at the
            # phase's token clock before the step.
            collate = self.collator.at_tokens(state.tokens) if hasattr(self.collator, "at_tokens") \
                else self.collator
            micro = [collate(group) for group in self.micro_batches(state, batch, samples)]
            after = LoaderState(state.step + 1, state.samples + batch, state.tokens + step_tokens)
            yield StepBatch(micro, after, batch, step_tokens,
                            rows_digest=rows_digest(samples, self.seq_len))


# ------------------------------------------------------------------------------------------------
# Validation batches


class ValidationBatches:
    """A fixed set of validation batches, the same at every evaluation: the sources' validation
    splits in stored order (for a mixture, each source contributes in proportion to its weight),
    at most ``batch_size * max_batches`` samples in all, whatever the world size (so validation
    figures compare across GPU counts); rank r takes every ``world_size``-th of them, ``batch_size``
    samples per batch. Iterable any number of times; collated on the fly."""

    def __init__(self, sources, *, seq_len: int, collator: Callable, batch_size: int,
                 max_batches: Optional[int] = None, rank: int = 0, world_size: int = 1,
                 truncate: bool = False, max_samples: Optional[int] = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.sources = [s for s in normalize_sources(sources) if source_format(s) != "order"]
        self.order, self.mine, self.positions, self.batch_size = [], [], [], batch_size
        if not self.sources:  # a replayed phase: the released order has no validation split
            import logging

            logging.getLogger("ettin").warning("a replayed data order has no validation split: "
                                               "no validation batches")
            return
        ids = getattr(collator, "ids", None)
        self.splits = open_splits(self.sources, "validation", seq_len, truncate, ids=ids)
        if ids is not None:
            check_prepared_tokenizer(self.splits, ids, vocab_size=getattr(collator, "vocab_size", None))
        sizes = np.array([len(s) for s in self.splits], dtype=np.int64)
        if not sizes.sum():
            raise ValueError(
                f"the validation split of {', '.join(str(s.root) for s in self.splits)} is empty "
                "(prepared with validation_fraction=0, or too little text); prepare with "
                "validation_fraction > 0, or turn validation off"
            )
        total = int(sizes.sum())
        if max_batches is not None:
            total = min(total, batch_size * max_batches)
        if max_samples is not None:  # a fixed set whatever the batch size
            total = min(total, max_samples)
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        counts = np.minimum(_largest_remainder(weights / weights.sum(), total), sizes)
        # What a capped source cannot give goes to the others, in order.
        for i in range(len(counts)):
            missing = total - int(counts.sum())
            if missing <= 0:
                break
            counts[i] += min(missing, int(sizes[i] - counts[i]))
        self.order = [(int(s), int(i)) for s, c in enumerate(counts) for i in range(int(c))]
        self.seq_len = seq_len
        self.close_rows = bool(getattr(collator, "close_rows", False))
        self.sep = None if ids is None else ids.sep
        self.collator, self.batch_size = collator, batch_size
        self.mine = self.order[rank::world_size]
        self.positions = list(range(rank, len(self.order), world_size))

    def __len__(self) -> int:
        return -(-len(self.mine) // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self.mine), self.batch_size):
            samples = []
            for position, (s, i) in zip(self.positions[start:start + self.batch_size],
                                        self.mine[start:start + self.batch_size]):
                tokens = fit_row(self.splits[s].tokens(i), self.seq_len, self.close_rows, self.sep)
                samples.append((position, tokens))
            yield self.collator(samples)


def validation_batches(sources, *, seq_len: int, collator: Callable, batch_size: int,
                       max_batches: Optional[int] = None, rank: int = 0, world_size: int = 1,
                       truncate: bool = False, max_samples: Optional[int] = None) -> list[dict]:
    """``list(ValidationBatches(...))``."""
    return list(ValidationBatches(sources, seq_len=seq_len, collator=collator,
                                  batch_size=batch_size, max_batches=max_batches, rank=rank,
                                  world_size=world_size, truncate=truncate, max_samples=max_samples))


def prepared_fingerprint(folder) -> Optional[str]:
    """What a run records of a prepared folder to prove later which data it saw: the sha256 of its
    summary.json (the settings that decide its content and its split sizes); None when absent."""
    summary = Path(folder) / "summary.json"
    return hashlib.sha256(summary.read_bytes()).hexdigest() if summary.is_file() else None
