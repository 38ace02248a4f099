"""MDS data ettin did not prepare: Ettin's released shards as they are published, or anything
streaming's ``MDSWriter`` wrote whose samples hold token ids, local or remote.

    {path: /data/ettin-pretraining-data, format: mds}                        # a local root
    {path: /data/ettin-pretraining-data/train/dclm, weight: 837.2}           # one source of it
    {path: hf://datasets/jhu-clsp/ettin-pretraining-data, format: mds}        # streamed: hf://, s3://, gs://
    {path: file:///mnt/share/ettin-pretraining-data}                          # a local root as a remote

A root is searched for ``index.json`` files at any depth, as Ettin published its data: per-source
folders holding split folders, each with its own index and shards
(``train/<source>/split_NN-tokenized-chunked-<len>/index.json``), with or without merged indexes
above them (an index whose shards another index already lists is skipped, so merged and per-folder
indexes never count a shard twice). Splits: the indexes under ``<root>/train/`` and
``<root>/validation/``; a root without split folders is all train. Without a validation split, the
last ``HELD_OUT_FRACTION`` of every index's samples (at least one) is held out of train and
validates instead (Ettin held out 0.1 % per source). Remote roots are listed with the storage's own
client (boto3 for s3://, google-cloud-storage for gs://, huggingface_hub for hf://).

Everything MDS is done by mosaicml-streaming: a ``Stream`` per index downloads the index and the
shards through streaming's downloaders (any of its storage back ends), checks their hashes when the
index has them and decompresses them; its ``MDSReader`` decodes samples. ettin adds what a training
run needs around it:

* one download per shard per machine: a shard is fetched under a file lock in the cache folder, so
  the ranks (and the DataLoader workers) of a node share one cache and wait for each other; an
  interrupted download leaves only temporary files, fetched again next time;
* a cache size limit (``cache_limit_gb``): after a download the least recently used other shards of
  the source are removed until its cache fits (a reader whose shard was removed fetches it again);
* the lengths the loader plans with (token clock, batch-size warmup) from a one-time index pass per
  index (below; ``python -m ettin.data.index`` runs it ahead), cached next to the data or in the
  cache folder;
* Ettin's row rules: a row that does not start with [CLS] gets one; rows longer than the sequence
  length are cut as Ettin's loader cut them (the loader's ``fit_row``).

Local folders of uncompressed shards are read in place; compressed ones (zstd, ...) are decompressed
into the cache, as streaming does.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import numpy as np

from ettin.data.files import file_lock, process_context
from ettin.store.fs import publishing, write_text

REMOTE_SCHEMES = ("hf", "s3", "gs", "file")
INDEX = "index.json"
SPLITS = ("train", "validation")
HELD_OUT_FRACTION = 0.001  # of every index's samples, when a root has no validation split
DOWNLOAD_TIMEOUT_S = 600  # per shard (streaming's default is 60)
FETCH_ATTEMPTS = 5  # a shard evicted by another process between fetch and read is fetched again


def default_cache_dir() -> Path:
    """``$ETTIN_CACHE_DIR``, else ``~/.cache/ettin``."""
    return Path(os.environ.get("ETTIN_CACHE_DIR") or Path.home() / ".cache" / "ettin")


def is_remote(path: str) -> bool:
    return urlparse(str(path)).scheme in REMOTE_SCHEMES


def looks_like_mds(path: str) -> bool:
    """A remote path, or a local folder (or folders: ``.../books*``) with an MDS index at any
    depth."""
    if is_remote(path):
        return True
    root, pattern = split_pattern(path)
    return any(next(_local_index_files(folder), None) is not None
               for folder in (Path(root).glob(pattern) if pattern else [Path(root)])
               if folder.is_dir())


def split_pattern(path: str) -> tuple[str, Optional[str]]:
    """(root, pattern) of a path whose last part names several top-level folders of a root with
    a shell pattern (``.../train/books*``: ``books`` and ``books_2``); (path, None) otherwise."""
    path = str(path).rstrip("/")
    head, _, last = path.rpartition("/")
    return (head, last) if head and any(c in last for c in "*?[") else (path, None)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _local_index_files(root: Path):
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if INDEX in files:
            yield Path(folder) / INDEX


def list_index_dirs(root: str) -> list[str]:
    """The folders (relative to ``root``, posix, '' for the root itself) that hold an index.json,
    at any depth: a local walk, or the remote storage's listing."""
    scheme = urlparse(root).scheme
    if scheme in ("", "file"):
        base = Path(root[len("file://"):] if scheme == "file" else root).expanduser()
        relative = (p.parent.relative_to(base).as_posix() for p in _local_index_files(base))
        return sorted("" if r == "." else r for r in relative)
    parsed = urlparse(root)
    prefix = parsed.path.strip("/")
    if scheme == "s3":
        import boto3

        client = boto3.session.Session().client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL"))
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=parsed.netloc, Prefix=f"{prefix}/" if prefix else "")
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    elif scheme == "gs":
        from google.cloud import storage

        keys = [blob.name for blob in storage.Client().list_blobs(
            parsed.netloc, prefix=f"{prefix}/" if prefix else None)]
    elif scheme == "hf":  # hf://datasets/OWNER/NAME[/path]
        from huggingface_hub import HfFileSystem

        base = f"{parsed.netloc}/{prefix}"
        keys = [name[len(base) + 1:] for name in HfFileSystem().find(base)]
        prefix = ""
    else:
        raise ValueError(f"cannot list {root}: give a local folder or an hf://, s3://, gs:// or "
                         "file:// path")
    found = []
    for key in keys:
        relative = key[len(prefix):].lstrip("/") if prefix else key
        parts = relative.split("/")
        if parts[-1] == INDEX and not any(part.startswith(".") for part in parts):
            found.append("/".join(parts[:-1]))
    return sorted(found)


def _under(folder: str, parent: str) -> bool:
    return folder == parent or folder.startswith(parent + "/")


class MDSFolder:
    """One index.json of an MDS tree: streaming's ``Stream`` over it (download, hashes,
    decompression) and the readers of its shards."""

    def __init__(self, remote: Optional[str], local: str, folder: str, *, column: str,
                 cache: Path, cache_limit: int) -> None:
        from streaming.base.stream import Stream
        from streaming.base.world import World

        self.folder, self.column, self.cache, self.cache_limit = folder, column, cache, cache_limit
        self.where = "/".join(p for p in (remote or local, folder) if p)
        self.stream = Stream(remote=remote, local=local, split=folder or None, keep_zip=False,
                             download_retry=2, download_timeout=DOWNLOAD_TIMEOUT_S)
        index = Path(local) / folder / INDEX
        try:
            self.readers = self.stream.get_shards(World(1, 1, 1, 0), allow_unsafe_types=False)
        except (ValueError, KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"{index} is not a readable MDS index ({type(error).__name__}: "
                             f"{error}); download it again or fix the folder") from None
        names = self.readers[0].column_names if self.readers else [column]
        if column not in names:
            raise ValueError(f"{index} has no column {column!r} (columns: {', '.join(names)}); "
                             "give the token id column: column=NAME")
        hashes = set.intersection(*[set(p.hashes) for r in self.readers for pair in r.file_pairs
                                    for p in pair if p is not None]) if self.readers else set()
        self.stream.validate_hash = sorted(hashes)[0] if hashes else None
        self.starts = np.cumsum([0] + [r.samples for r in self.readers])

    @property
    def samples(self) -> int:
        return int(self.starts[-1])

    def shard_files(self) -> list[str]:
        """The shards' paths relative to the root (what another index may list too)."""
        return [os.path.normpath(os.path.join(self.folder, r.raw_data.basename)) for r in self.readers]

    def shard_file(self, shard: int) -> Path:
        reader = self.readers[shard]
        return Path(reader.dirname) / (reader.split or "") / reader.raw_data.basename

    def ensure_shard(self, shard: int) -> Path:
        """The shard's raw file, downloaded / decompressed first when it is not in the cache."""
        path = self.shard_file(shard)
        if self.stream.remote is None:
            return path
        reader = self.readers[shard]
        with file_lock(Path(self.stream.local) / ".locks" / self.folder /
                       (reader.raw_data.basename + ".lock")):
            fetched = not path.is_file()  # another process of this node may have fetched it
            if fetched:
                try:
                    self.stream.prepare_shard(reader)
                except Exception as error:
                    raise OSError(f"cannot fetch shard {reader.raw_data.basename} of "
                                  f"{self.stream.remote}/{self.folder}: {type(error).__name__}: "
                                  f"{error}") from None
                if path.stat().st_size != reader.raw_data.bytes:
                    path.unlink()
                    raise OSError(f"shard {path} has {path.stat().st_size} bytes instead of "
                                  f"{reader.raw_data.bytes}: fetch it again")
            os.utime(path)  # recently used: evicted last
        if fetched:
            self._fit_cache(keep=path)
        return path

    def _fit_cache(self, keep: Path) -> None:
        """Remove the least recently used shards of the source's cache folder (not ``keep``) until
        it holds at most ``cache_limit`` bytes (a reader whose shard goes fetches it again)."""
        if not self.cache_limit:
            return
        present = []
        for path in Path(self.stream.local).rglob("*.mds"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            present.append((stat.st_mtime, os.path.normpath(path), stat.st_size))
        used = sum(size for _, _, size in present)
        for _, path, size in sorted(present):
            if used <= self.cache_limit:
                break
            if path != os.path.normpath(keep):
                Path(path).unlink(missing_ok=True)
                used -= size

    def raw_tokens(self, shard: int, local: int) -> np.ndarray:
        """The token ids of sample ``local`` of ``shard`` as stored (MDSReader decodes them)."""
        for attempt in range(FETCH_ATTEMPTS):
            try:
                self.ensure_shard(shard)
                sample = self.readers[shard].get_item(local)
                break
            except FileNotFoundError:  # evicted by another process just now: fetch it again
                if attempt == FETCH_ATTEMPTS - 1:
                    raise OSError(f"shard {self.shard_file(shard)} was evicted {FETCH_ATTEMPTS} "
                                  "times before it could be read: raise cache_limit_gb") from None
        return np.asarray(sample[self.column]).reshape(-1)

    def tokens(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.raw_tokens(shard, index - int(self.starts[shard]))


class MDSSplit:
    """One split of an MDS root, with the interface of a prepared split: ``len``, ``lengths``
    (the row lengths after the [CLS] rule), ``mean_length``, ``tokens(i)``.

    ``cls``: the tokenizer's [CLS] id, inserted in front of rows without it (None: rows as stored,
    for checks that read no rows)."""

    truncates = True  # Ettin's loader cut rows longer than the sequence length

    def __init__(self, path: str, split: str, *, column: str = "input_ids",
                 cache_dir: Optional[str] = None, cache_limit_gb: float = 0.0,
                 cls: Optional[int] = None, index_num_proc: Optional[int] = None) -> None:
        self.root, self.split, self.column, self.cls = str(path), split, column, cls
        self.cache_limit = int(cache_limit_gb * (1 << 30))
        self.cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "mds"
        self.folders, self.held_out = self._open_folders()
        # The split's samples: (folder, first sample, end) ranges, in the folders' order.
        self.ranges = []
        for i, folder in enumerate(self.folders):
            kept = folder.samples - (math.ceil(folder.samples * HELD_OUT_FRACTION)
                                     if self.held_out is not None else 0)
            self.ranges.append((i, 0, kept) if self.held_out != "validation" else
                               (i, kept, folder.samples))
        self.starts = np.cumsum([0] + [end - begin for _, begin, end in self.ranges])
        indexes = [load_or_build_index(f, num_proc=index_num_proc) for f in self.folders]
        self.index_meta = [index["meta"] for index in indexes]
        pieces = [(np.asarray(indexes[i]["lengths"][b:e]), np.asarray(indexes[i]["first"][b:e]))
                  for i, b, e in self.ranges]
        raw = np.concatenate([p[0] for p in pieces]).astype(np.int64) if pieces else np.zeros(0, np.int64)
        self.first_ids = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.uint32)
        self.max_id = max((int(m["max_id"]) for m in self.index_meta), default=-1)
        self.lengths = raw if cls is None else raw + (self.first_ids != cls)
        self.max_seq_len = int(np.max(self.lengths)) if len(self.lengths) else 0

    # -- where things are --------------------------------------------------------------------

    @property
    def where(self) -> str:
        return f"{self.root} ({self.split})"

    def _open_folders(self) -> tuple[list[MDSFolder], Optional[str]]:
        """The indexes of this split, and whether it is a held-out part of train (None: no;
        "train": train without it; "validation": the held-out samples)."""
        remote, local = self._locations()
        try:
            found = list_index_dirs(remote or local)
        except Exception as error:  # unreachable remote, missing credentials: named below
            raise FileNotFoundError(f"cannot list {self.root}: {type(error).__name__}: {error}; "
                                    "check the path and the storage's credentials") from None
        if self.pattern is not None:
            found = [f for f in found if fnmatch.fnmatchcase(f.split("/")[0], self.pattern)]
        split_folders = [f for f in found if f.split("/")[0] in SPLITS]
        held_out = None
        if split_folders:
            mine = [f for f in found if _under(f, self.split)]
            if self.split == "validation" and not mine:
                mine, held_out = [f for f in found if _under(f, "train")], "validation"
            elif self.split == "train" and not any(_under(f, "validation") for f in found):
                held_out = "train"
        else:
            mine, held_out = found, self.split
        if not mine:
            raise FileNotFoundError(
                f"{self.root} has no MDS index (index.json) for its {self.split} split, at any "
                "depth. Give a folder written by streaming's MDSWriter (Ettin's released data: "
                "train/<source>/<split folder>/index.json), or a folder prepared with "
                "python -m ettin.data.prepare")
        folders, covered = [], set()
        for folder in sorted(mine, key=lambda f: (-f.count("/") - bool(f), f)):  # deepest first
            opened = self._open_folder(remote, local, folder)
            shards = set(opened.shard_files())
            if shards <= covered:  # a merged index of folders already read
                continue
            if shards & covered:
                raise ValueError(f"the index {self.root}/{folder}/{INDEX} lists some shards that "
                                 "other indexes also list, and others they do not: merge the "
                                 "indexes again (streaming's merge_index) or delete the merged one")
            covered |= shards
            folders.append(opened)
        return sorted(folders, key=lambda f: f.folder), held_out

    def _locations(self) -> tuple[Optional[str], str]:
        """(remote or None, local folder) of the root (without a pattern's last part): a remote is
        cached under its digest."""
        root, self.pattern = split_pattern(self.root)
        if is_remote(root):
            remote = root[len("file://"):] if root.startswith("file://") else root
            return remote, str(self.cache / _digest(remote))
        return None, str(Path(root).expanduser())

    def _open_folder(self, remote: Optional[str], local: str, folder: str) -> MDSFolder:
        if remote is None:
            index = Path(local) / folder / INDEX
            shards = json.loads(index.read_text()).get("shards", [])
            if any(s.get("compression") and not (index.parent / s["raw_data"]["basename"]).is_file()
                   for s in shards):  # decompressed into the cache, as a remote would be
                remote, local = local, str(self.cache / _digest(str(Path(local).resolve())))
        if remote is not None:
            self._fetch_index(remote, local, folder)
        return MDSFolder(remote, local, folder, column=self.column, cache=self.cache,
                         cache_limit=self.cache_limit)

    @staticmethod
    def _fetch_index(remote: str, local: str, folder: str) -> None:
        from streaming.base.storage.download import CloudDownloader

        target = Path(local) / folder / INDEX
        with file_lock(Path(local) / ".locks" / folder / "index.lock"):
            if target.is_file():
                return
            with publishing(target) as partial:
                try:
                    CloudDownloader.direct_download(f"{remote}/{folder}/{INDEX}" if folder else
                                                    f"{remote}/{INDEX}", str(partial), DOWNLOAD_TIMEOUT_S)
                except Exception as error:
                    raise FileNotFoundError(f"cannot download {remote}/{folder}/{INDEX}: "
                                            f"{type(error).__name__}: {error}") from None

    # -- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.lengths)

    def mean_length(self, seq_len: int) -> float:
        return float(np.minimum(np.asarray(self.lengths), seq_len).mean())

    def tokens(self, index: int) -> np.ndarray:
        """Row ``index``: the stored ids, with [CLS] in front when they lack it."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {self.where} (it has {len(self)})")
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        folder, begin, _ = self.ranges[part]
        ids = self.folders[folder].tokens(begin + index - int(self.starts[part]))
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


def index_dir(folder: MDSFolder) -> Path:
    """Next to the folder's index.json when it can be written there, else the cache folder."""
    here = Path(folder.stream.local) / folder.folder
    if os.access(here, os.W_OK):
        return here
    return folder.cache / _digest(str(Path(folder.stream.local).resolve())) / folder.folder


def signature(folder: MDSFolder) -> str:
    """What the index depends on: the folder's index.json and the column."""
    index = (Path(folder.stream.local) / folder.folder / INDEX).read_bytes()
    return hashlib.sha1(index + folder.column.encode()).hexdigest()


def _index_shard(args) -> tuple[int, np.ndarray, np.ndarray, int]:
    folder, shard = args
    folder.ensure_shard(shard)
    reader = folder.readers[shard]
    lengths = np.empty(reader.samples, np.uint32)
    first = np.zeros(reader.samples, np.uint32)
    largest = -1
    for i in range(reader.samples):
        ids = folder.raw_tokens(shard, i)
        lengths[i] = len(ids)
        if len(ids):
            first[i] = ids[0]
            largest = max(largest, int(ids.max()))
    return shard, lengths, first, largest


def build_index(folder: MDSFolder, num_proc: int = 1, progress: bool = False) -> dict:
    """Index every shard of ``folder`` and write the index files."""
    from tqdm import tqdm

    out = index_dir(folder)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"ettin-index-{folder.column}"
    total = folder.samples
    started = time.perf_counter()
    with publishing(f"{stem}.lengths.npy") as lengths_file, publishing(f"{stem}.first.npy") as first_file:
        lengths = np.lib.format.open_memmap(lengths_file, "w+", np.uint32, (total,))
        first = np.lib.format.open_memmap(first_file, "w+", np.uint32, (total,))
        jobs = [(folder, shard) for shard in range(len(folder.readers))]
        bar = tqdm(total=len(jobs), desc=f"indexing {folder.where}", unit=" shards",
                   disable=not progress, file=sys.stderr)
        if num_proc > 1 and len(jobs) > 1:
            with process_context(["ettin.data.mds", "streaming"]).Pool(num_proc) as pool:
                results = pool.imap_unordered(_index_shard, jobs)
                largest = _collect(results, folder, lengths, first, bar)
        else:
            largest = _collect(map(_index_shard, jobs), folder, lengths, first, bar)
        bar.close()
        lengths.flush(), first.flush()
        del lengths, first
    seconds = time.perf_counter() - started
    meta = {"version": VERSION, "signature": signature(folder), "column": folder.column,
            "samples": total, "max_id": largest,
            "tokens": int(np.load(f"{stem}.lengths.npy", mmap_mode="r").sum(dtype=np.int64)),
            "seconds": round(seconds, 3), "num_proc": max(1, num_proc)}
    write_text(f"{stem}.json", json.dumps(meta, indent=2) + "\n")  # written last: the index is complete
    return meta


def _collect(results, folder, lengths, first, bar) -> int:
    largest = -1
    for shard, shard_lengths, shard_first, shard_largest in results:
        begin, end = int(folder.starts[shard]), int(folder.starts[shard + 1])
        lengths[begin:end], first[begin:end] = shard_lengths, shard_first
        largest = max(largest, shard_largest)
        bar.update(1)
    return largest


def load_or_build_index(folder: MDSFolder, num_proc: Optional[int] = None) -> dict:
    """``{"lengths", "first"}`` (memory-mapped), ``max_id`` and ``meta`` of ``folder``; built
    first when missing or stale (one process builds it, the others wait on the lock)."""
    stem = index_dir(folder) / f"ettin-index-{folder.column}"

    def current() -> Optional[dict]:
        try:
            meta = json.loads(Path(f"{stem}.json").read_text())
        except (OSError, ValueError):
            return None
        return meta if meta.get("version") == VERSION and meta.get("signature") == signature(folder) \
            else None

    meta = current()
    if meta is None:
        with file_lock(Path(f"{stem}.lock")):
            meta = current()
            if meta is None:
                meta = build_index(folder, num_proc=num_proc or 1)
    lengths = np.load(f"{stem}.lengths.npy", mmap_mode="r")
    first = np.load(f"{stem}.first.npy", mmap_mode="r")
    if len(lengths) != folder.samples:
        raise ValueError(f"the index {stem}.lengths.npy of {folder.where} lists {len(lengths)} "
                         f"samples, the shards {folder.samples}: delete it and run "
                         f"python -m ettin.data.index {folder.where}")
    return {"lengths": lengths, "first": first, "max_id": meta["max_id"], "meta": meta}
