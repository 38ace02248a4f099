"""MDS folders ettin did not prepare: Ettin's released shards, or anything streaming's ``MDSWriter``
wrote whose samples hold token ids, local or remote.

    {path: /data/ettin-pretraining-data, format: mds}                 # a local folder
    {path: hf://datasets/jhu-clsp/ettin-pretraining-data, format: mds} # streamed: hf://, s3://, gs://
    {path: file:///mnt/share/ettin-pretraining-data}                   # a local folder as a remote

A split is ``<path>/<split>/index.json`` (a merged index of nested sub-folders, as streaming's
``merge_index`` writes it), or ``<path>/index.json`` for ``train`` when there are no split folders.
Everything MDS is done by mosaicml-streaming: its ``Stream`` downloads the index and the shards
(any of its storage back ends), checks their hashes when the index has them and decompresses them;
its ``MDSReader`` decodes samples. ettin adds what a training run needs around it:

* one download per shard per machine: a shard is fetched under a file lock in the cache folder, so
  the ranks (and the DataLoader workers) of a node share one cache and wait for each other; an
  interrupted download leaves only temporary files, fetched again next time;
* a cache size limit (``cache_limit_gb``): after a download the least recently used other shards are
  removed until the cache fits (a reader whose shard was removed fetches it again);
* the lengths the loader plans with (token clock, batch-size warmup) from a one-time index pass
  (below; ``python -m ettin.data.index`` runs it ahead), cached next to the data or in the cache folder;
* Ettin's row rules: a row that does not start with [CLS] gets one; rows longer than the sequence
  length are cut as Ettin's loader cut them (the loader's ``fit_row``).

Local folders of uncompressed shards are read in place; compressed ones (zstd, ...) are decompressed
into the cache, as streaming does.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import numpy as np

from ettin.data.files import file_lock, process_context

REMOTE_SCHEMES = ("hf", "s3", "gs", "file")
INDEX = "index.json"
DOWNLOAD_TIMEOUT_S = 600  # per shard (streaming's default is 60)
FETCH_ATTEMPTS = 5  # a shard evicted by another process between fetch and read is fetched again


def default_cache_dir() -> Path:
    """``$ETTIN_CACHE_DIR``, else ``~/.cache/ettin``."""
    return Path(os.environ.get("ETTIN_CACHE_DIR") or Path.home() / ".cache" / "ettin")


def is_remote(path: str) -> bool:
    return urlparse(str(path)).scheme in REMOTE_SCHEMES


def looks_like_mds(path: str) -> bool:
    """A remote path, or a local folder with an MDS index (at its root or in train/)."""
    if is_remote(path):
        return True
    root = Path(path)
    return (root / INDEX).is_file() or (root / "train" / INDEX).is_file()


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class MDSSplit:
    """One split of an MDS folder, with the interface of a prepared split: ``len``, ``lengths``
    (memory-mapped, the row lengths after the [CLS] rule), ``mean_length``, ``tokens(i)``.

    ``cls``: the tokenizer's [CLS] id, inserted in front of rows without it (None: rows as stored,
    for checks that read no rows)."""

    truncates = True  # Ettin's loader cut rows longer than the sequence length

    def __init__(self, path: str, split: str, *, column: str = "input_ids",
                 cache_dir: Optional[str] = None, cache_limit_gb: float = 0.0,
                 cls: Optional[int] = None, index_num_proc: Optional[int] = None) -> None:
        from streaming.base.stream import Stream

        self.root, self.split, self.column, self.cls = str(path), split, column, cls
        self.cache_limit = int(cache_limit_gb * (1 << 30))
        self.cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "mds"
        remote, local, split_dir = self._locations()
        self.split_dir = split_dir
        self.local_root = local
        self.stream = Stream(remote=remote, local=local, split=split_dir, keep_zip=False,
                             download_retry=2, download_timeout=DOWNLOAD_TIMEOUT_S)
        self.readers = self._load_index(split_dir)
        if self.readers is None:  # the split does not exist: an empty split
            self.readers, self.starts = [], np.zeros(1, np.int64)
            self.lengths = np.zeros(0, np.int64)
            self.max_id, self.max_seq_len = -1, 0
            return
        names = self.readers[0].column_names if self.readers else [column]
        if column not in names:
            raise ValueError(f"{self.where} has no column {column!r} (columns: "
                             f"{', '.join(names)}); give the token id column: column=NAME")
        hashes = set.intersection(*[set(p.hashes) for r in self.readers for pair in r.file_pairs
                                    for p in pair if p is not None]) if self.readers else set()
        self.stream.validate_hash = sorted(hashes)[0] if hashes else None
        self.starts = np.cumsum([0] + [r.samples for r in self.readers])
        index = load_or_build_index(self, num_proc=index_num_proc)
        raw, first = index["lengths"], index["first"]
        self.max_id = int(index["max_id"])
        self.lengths = raw if cls is None else raw + (np.asarray(first) != cls)
        self.max_seq_len = int(np.max(self.lengths)) if len(self.lengths) else 0
        self.first_ids = first

    # -- where things are --------------------------------------------------------------------

    @property
    def where(self) -> str:
        return f"{self.root} ({self.split})"

    def _locations(self) -> tuple[Optional[str], str, str]:
        """(remote or None, local folder, split folder) for streaming's Stream."""
        cache = self.cache
        if is_remote(self.root):
            remote = self.root[len("file://"):] if self.root.startswith("file://") else self.root
            remote = remote.rstrip("/")
            local = str(cache / _digest(remote))
            return remote, local, self._remote_split(remote, local)
        root = Path(self.root).expanduser()
        split_dir = self.split
        if self.split == "train" and not (root / "train" / INDEX).is_file() and (root / INDEX).is_file():
            split_dir = ""  # one index for the whole folder: all of it is train
        index = root / split_dir / INDEX
        if index.is_file():
            shards = json.loads(index.read_text()).get("shards", [])
            if any(s.get("compression") and not (root / split_dir / s["raw_data"]["basename"]).is_file()
                   for s in shards):  # decompressed into the cache, as a remote would be
                local = str(cache / _digest(str(root.resolve())))
                self._fetch_index(str(root), local, split_dir)
                return str(root), local, split_dir
        return None, str(root), split_dir

    def _remote_split(self, remote: str, local: str) -> str:
        """``split`` if the remote has ``<split>/index.json``; else '' for train (a single index)."""
        for split_dir in (self.split, "") if self.split == "train" else (self.split,):
            if self._fetch_index(remote, local, split_dir):
                return split_dir
        return self.split

    def _fetch_index(self, remote: str, local: str, split_dir: str) -> bool:
        from streaming.base.storage.download import CloudDownloader

        target = Path(local) / split_dir / INDEX
        with file_lock(Path(local) / ".locks" / split_dir / "index.lock"):
            if target.is_file():
                return True
            try:
                partial = f"{target}.tmp-{os.getpid()}"
                CloudDownloader.direct_download(os.path.join(remote, split_dir, INDEX), partial)
            except Exception:  # missing split, unreachable remote: decided by the caller
                return False
            os.replace(partial, target)
        return True

    def _load_index(self, split_dir: str):
        from streaming.base.world import World

        index = Path(self.stream.local) / split_dir / INDEX
        if not index.is_file():
            if self.split == "train":
                raise FileNotFoundError(
                    f"{self.root} has no MDS index for its train split ({split_dir or '.'}/{INDEX}"
                    f"{', and the remote cannot be read' if is_remote(self.root) else ''}). Give a "
                    "folder written by streaming's MDSWriter (train/ and validation/ splits), or a "
                    "folder prepared with python -m ettin.data.prepare")
            return None
        try:
            return self.stream.get_shards(World(1, 1, 1, 0), allow_unsafe_types=False)
        except (ValueError, KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"{index} is not a readable MDS index ({type(error).__name__}: "
                             f"{error}); download it again or fix the folder") from None

    # -- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.lengths)

    def mean_length(self, seq_len: int) -> float:
        return float(np.minimum(np.asarray(self.lengths), seq_len).mean())

    def shard_file(self, shard: int) -> Path:
        reader = self.readers[shard]
        return Path(reader.dirname) / reader.split / reader.raw_data.basename

    def ensure_shard(self, shard: int) -> Path:
        """The shard's raw file, downloaded / decompressed first when it is not in the cache."""
        path = self.shard_file(shard)
        if self.stream.remote is None:
            return path
        reader = self.readers[shard]
        with file_lock(Path(self.stream.local) / ".locks" / reader.split /
                       (reader.raw_data.basename + ".lock")):
            fetched = not path.is_file()  # another process of this node may have fetched it
            if fetched:
                try:
                    self.stream.prepare_shard(reader)
                except Exception as error:
                    raise OSError(f"cannot fetch shard {reader.raw_data.basename} of {self.where}: "
                                  f"{type(error).__name__}: {error}") from None
                if path.stat().st_size != reader.raw_data.bytes:
                    path.unlink()
                    raise OSError(f"shard {path} has {path.stat().st_size} bytes instead of "
                                  f"{reader.raw_data.bytes}: fetch it again")
            os.utime(path)  # recently used: evicted last
        if fetched:
            self._fit_cache(keep=shard)
        return path

    def _fit_cache(self, keep: int) -> None:
        """Remove the least recently used shards of this split (not ``keep``) until the cache is
        within ``cache_limit`` bytes (a reader whose shard goes fetches it again)."""
        if not self.cache_limit:
            return
        present = []
        for i in range(len(self.readers)):
            try:
                stat = self.shard_file(i).stat()
            except FileNotFoundError:
                continue
            present.append((stat.st_mtime, i, stat.st_size))
        used = sum(size for _, _, size in present)
        for _, i, size in sorted(present):
            if used <= self.cache_limit:
                break
            if i != keep:
                self.shard_file(i).unlink(missing_ok=True)
                used -= size

    def raw_tokens(self, shard: int, local: int) -> np.ndarray:
        """The token ids of sample ``local`` of ``shard`` as stored (MDSReader decodes them)."""
        for attempt in range(FETCH_ATTEMPTS):
            self.ensure_shard(shard)
            try:
                sample = self.readers[shard].get_item(local)
                break
            except FileNotFoundError:  # evicted by another process just now: fetch it again
                if attempt == FETCH_ATTEMPTS - 1:
                    raise OSError(f"shard {self.shard_file(shard)} of {self.where} was evicted "
                                  f"{FETCH_ATTEMPTS} times before it could be read: raise "
                                  "cache_limit_gb") from None
        return np.asarray(sample[self.column]).reshape(-1)

    def tokens(self, index: int) -> np.ndarray:
        """Row ``index``: the stored ids, with [CLS] in front when they lack it."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {self.where} (it has {len(self)})")
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        ids = self.raw_tokens(shard, index - int(self.starts[shard]))
        if self.cls is not None and (not len(ids) or ids[0] != self.cls):
            ids = np.concatenate(([self.cls], ids)).astype(ids.dtype)
        if len(ids) != int(self.lengths[index]):
            raise ValueError(f"sample {index} of {self.where} has {len(ids)} tokens but its index "
                             f"says {int(self.lengths[index])}: the shards changed after the index "
                             f"pass; delete the index and run python -m ettin.data.index {self.root}")
        return ids

    def __getstate__(self) -> dict:  # DataLoader workers get their own readers
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------------
# The index pass: every sample's length and first token, and the largest id.

VERSION = 1


def index_dir(split) -> Path:
    """Next to the split when it can be written there, else the cache folder."""
    here = Path(split.stream.local) / split.split_dir
    if os.access(here, os.W_OK):
        return here
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
