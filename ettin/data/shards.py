"""Tokenize, chunk and write a prepared folder (the format ``python -m ettin.data.prepare`` makes, see
its docstring): the chunking rules, the tokenizing worker processes, and the writer of the MDS shards,
lengths.npy and summary.json. The datatrove executor (ettin.data.executor) runs the same pieces as
tasks."""


from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from ettin.data.files import process_context
from ettin.store.fs import publishing
from ettin.data.reading import (Document, PrepareError, Skips, input_files,
                                input_fingerprint, read_documents)
from ettin.store.fs import COMPLETE
from ettin.data.tokenizer import special_ids, tokenizer_fingerprint

FORMAT = "ettin-prepared-v1"
SPLITS = ("train", "validation")
CHUNKINGS = ("balanced", "ettin")
UNIT_CHARS = 1 << 18  # documents are tokenized in units of about 256k characters
UNIT_DOCS = 2048
MAX_LISTED = 50  # longest lists (files, sources) kept whole in the summary
SHARD_HASHES = ["sha256"]


@dataclass
class PrepareConfig:
    input: str = "???"  # a file or folder, "builtin", or a hub dataset name
    output: str = "???"
    tokenizer: str = "???"  # a tokenizer folder or hub id
    max_seq_len: int = 1024  # the phase's sequence length: chunks hold at most this many tokens
    validation_fraction: float = 0.01  # share of documents held out (whole documents)
    min_tail: int = 512  # a last chunk shorter than min(min_tail, (max_seq_len-2)//2) is rebalanced
    chunking: str = "balanced"  # balanced (no token dropped or repeated) | ettin (Ettin's scripts)
    min_chunk_size: int = 512  # ettin: a shorter last chunk is back-filled from the one before it
    always_skip_size: int = 128  # ettin: a shorter chunk is dropped (a document's first is kept)
    add_prefix_space: bool = False  # byte-level tokenizers: tokenize " " + text (Ettin: true)
    text_column: str = "text"  # of .jsonl/.json/.parquet/.csv files and hub datasets
    text_unit: str = "document"  # .txt/.md: a document is a whole file, a paragraph, or a line
    hub_config: Optional[str] = None  # the configuration of a hub dataset
    split: str = "train"  # of a hub dataset
    max_documents: Optional[int] = None  # stop after this many documents (quick trials)
    seed: int = 42  # decides which documents are held out
    num_proc: int = 0  # tokenizer processes; 0 = one per CPU core (fewer for a small input)
    shard_size_mb: int = 64
    strict: bool = False  # a malformed row or an unreadable file is an error instead of a counted skip
    overwrite: bool = False  # replace a finished folder prepared with other settings
    progress: bool = True
    executor: str = "none"  # none (num_proc processes here) | local | slurm (datatrove; ettin/data/executor.py)
    tasks: int = 1  # executor: tasks, each tokenizing every tasks-th unit of the input
    workers: int = -1  # executor=local: tasks run at once (-1: all)
    partition: Optional[str] = None  # executor=slurm
    time: str = "24:00:00"  # executor=slurm: per task
    cpus_per_task: int = 1  # executor=slurm
    mem_per_cpu_gb: int = 2  # executor=slurm
    sbatch_args: Optional[str] = None  # executor=slurm: sbatch options separated by spaces: "exclude=n1,n2 --qos=high --exclusive"


# ------------------------------------------------------------------------------------------------
# Chunking


def chunk_bounds(n: int, max_seq_len: int, min_tail: int = 0) -> list[tuple[int, int]]:
    """[start, end) of each chunk's share of a document's ``n`` tokens (see the module docstring)."""
    capacity = max_seq_len - 2
    if capacity < 1:
        raise PrepareError(f"max_seq_len={max_seq_len} leaves no room for text next to [CLS] and "
                           "[SEP]; use at least 3")
    if n <= capacity:
        return [(0, n)]
    starts = list(range(0, n, capacity))
    bounds = [(s, min(s + capacity, n)) for s in starts]
    tail = bounds[-1][1] - bounds[-1][0]
    if tail < min(min_tail, capacity // 2):
        begin = bounds[-2][0]
        middle = begin + (n - begin + 1) // 2
        bounds[-2:] = [(begin, middle), (middle, n)]
    return bounds


def chunk_document(ids: np.ndarray, max_seq_len: int, cls: int, sep: int,
                   min_tail: int = 0) -> list[np.ndarray]:
    """The chunks of one document: ``[CLS] ...`` each, ``... [SEP]`` for the last."""
    ids = np.asarray(ids)
    bounds = chunk_bounds(len(ids), max_seq_len, min_tail)
    chunks = [np.concatenate(([cls], ids[a:b])).astype(ids.dtype) for a, b in bounds]
    chunks[-1] = np.append(chunks[-1], sep).astype(ids.dtype)
    return chunks


def ettin_chunks(tokens: np.ndarray, max_seq_len: int, cls: int, min_chunk_size: int,
                 always_skip_size: int, rng: np.random.Generator) -> tuple[list[np.ndarray], int]:
    """Ettin's chunker (``split_dataset_into_chunks_individual.py -c max_seq_len -m min_chunk_size
    -a always_skip_size --backfill --backfill_no_duplicates``) on a document's ``tokens``, which
    hold its [CLS] and [SEP]: pieces of ``max_seq_len - 2`` tokens; a piece shorter than
    ``always_skip_size`` is dropped unless it is the first; a later piece shorter than
    ``min_chunk_size`` takes a random number r in [0, max_seq_len - 2 - len) of tokens from the end
    of the chunk before it; every chunk gets [CLS] in front if it lacks it. Returns the chunks and
    the number of tokens dropped. (Not reproduced: Ettin's decode / re-encode of chunks whose text
    does not start with a space.)"""
    capacity = max_seq_len - 2
    pieces = np.array_split(tokens, np.arange(capacity, len(tokens), capacity))
    chunks: list[np.ndarray] = []
    dropped = 0
    for i, piece in enumerate(pieces):
        if i and len(piece) < always_skip_size:
            dropped += len(piece)
            continue
        if i and len(piece) < min_chunk_size:
            moved = int(rng.integers(0, capacity - len(piece)))
            if moved:
                piece = np.concatenate((chunks[-1][-moved:], piece))
                chunks[-1] = chunks[-1][:-moved]
        chunks.append(piece)
    with_cls = [c if c[0] == cls else np.concatenate(([cls], c)).astype(tokens.dtype) for c in chunks]
    return with_cls, dropped


# ------------------------------------------------------------------------------------------------
# Tokenizing (in worker processes)


@dataclass
class UnitResult:
    """One unit of documents, tokenized, chunked and encoded as MDS samples. Per split: the encoded
    samples, their lengths in tokens and their document ids; per document: (index, source, split,
    tokens, chunks, tail rebalanced)."""

    samples: dict  # split -> list of bytes (MDS-encoded samples, ready for the shard)
    lengths: dict  # split -> int32 array
    doc_ids: dict  # split -> int64 array (one per chunk)
    documents: list


_worker: dict = {}


def _init_worker(tokenizer_file: str, settings: dict) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_file)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    # Special-token strings inside the text are plain text; specials come from the chunker only.
    tokenizer.encode_special_tokens = True
    if settings.get("add_prefix_space"):
        tokenizer.pre_tokenizer.add_prefix_space = True  # checked to be ByteLevel before
    _worker.update(settings, tokenizer=tokenizer)


def encode_sample(chunk: np.ndarray, doc_id: int) -> bytes:
    """One sample exactly as ``MDSWriter(columns=columns_for(dtype)).encode_sample`` encodes it
    (tests check this), without importing ``streaming`` (which imports torch) in the workers.
    Columns in sorted order: doc_id (int64), input_ids (ndarray: a byte ``ndim << 2 | shape
    dtype``, the shape, the values); the variable-size column's byte count comes first."""
    n = len(chunk)
    shape_code, shape_dtype = (0, np.uint8) if n < 1 << 8 else (1, np.uint16) if n < 1 << 16 \
        else (2, np.uint32)
    data = bytes([(1 << 2) | shape_code]) + np.array([n], shape_dtype).tobytes() + chunk.tobytes()
    return np.uint32(len(data)).tobytes() + np.int64(doc_id).tobytes() + data


def columns_for(dtype: str) -> dict:
    return {"input_ids": f"ndarray:{dtype}", "doc_id": "int"}


def _tokenize_unit(unit: list[Document]) -> UnitResult:
    w = _worker
    encode = getattr(w["tokenizer"], "encode_batch_fast", w["tokenizer"].encode_batch)
    encodings = encode([d.text for d in unit], add_special_tokens=False)
    dtype, max_seq_len, min_tail = np.dtype(w["dtype"]), w["max_seq_len"], w["min_tail"]
    cls, sep = np.array([w["cls"]], dtype), np.array([w["sep"]], dtype)
    samples: dict = {s: [] for s in SPLITS}
    lengths: dict = {s: [] for s in SPLITS}
    doc_ids: dict = {s: [] for s in SPLITS}
    documents = []
    for document, encoding in zip(unit, encodings):
        ids = np.asarray(encoding.ids, dtype=dtype)
        if len(ids) == 0:  # e.g. text that the normalizer removes entirely
            documents.append((document.index, document.source, None, 0, 0, False, 0))
            continue
        split = "validation" if is_validation(document.index, w["fraction"], w["seed"]) else "train"
        if w["chunking"] == "ettin":
            rng = np.random.default_rng([w["seed"], document.index])
            chunks, _ = ettin_chunks(np.concatenate((cls, ids, sep)), max_seq_len, w["cls"],
                                     w["min_chunk_size"], w["always_skip_size"], rng)
            rebalanced = len(chunks) > 1 and len(chunks[-2]) < max_seq_len - 1
        else:
            bounds = chunk_bounds(len(ids), max_seq_len, min_tail)
            chunks = [np.concatenate((cls, ids[a:b], sep) if i == len(bounds) - 1 else (cls, ids[a:b]))
                      for i, (a, b) in enumerate(bounds)]
            rebalanced = len(bounds) > 1 and bounds[-2][1] - bounds[-2][0] < max_seq_len - 2
        for chunk in chunks:
            samples[split].append(encode_sample(chunk, document.index))
            lengths[split].append(len(chunk))
            doc_ids[split].append(document.index)
        documents.append((document.index, document.source, split, len(ids), len(chunks),
                          rebalanced, sum(len(c) for c in chunks)))
    return UnitResult(
        samples=samples,
        lengths={s: np.asarray(lengths[s], dtype=np.int32) for s in SPLITS},
        doc_ids={s: np.asarray(doc_ids[s], dtype=np.int64) for s in SPLITS},
        documents=documents,
    )


def is_validation(index: int, fraction: float, seed: int) -> bool:
    """Whether document ``index`` is held out: a hash of (seed, index) below ``fraction``; the first
    document is always held out (when fraction > 0) so that a small corpus has a validation split."""
    if fraction <= 0:
        return False
    if index == 0:
        return True
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def _units(documents: Iterable[Document]) -> Iterator[list[Document]]:
    unit: list[Document] = []
    chars = 0
    for document in documents:
        unit.append(document)
        chars += len(document.text)
        if chars >= UNIT_CHARS or len(unit) >= UNIT_DOCS:
            yield unit
            unit, chars = [], 0
    if unit:
        yield unit


def _ordered_map(function: Callable, items: Iterable, processes: int, initializer, initargs):
    """``map`` in ``processes`` worker processes, results in input order, at most 2 x processes
    items in flight (``Pool.imap`` would read the whole input ahead)."""
    if processes <= 1:
        initializer(*initargs)
        yield from map(function, items)
        return
    context = process_context(["ettin.data.prepare", "tokenizers"])
    with context.Pool(processes, initializer, initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(function, (item,)))
            if len(pending) >= 2 * processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


PROCESS_BYTES = 8 << 20  # num_proc=0 starts one process per 8 MB of local input, up to one per core


def worker_count(cfg: PrepareConfig) -> int:
    """``num_proc``, or (0) one per CPU core, fewer for small local input (a small corpus is done
    before extra processes would have started)."""
    if cfg.num_proc > 0:
        return cfg.num_proc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    size = None
    if cfg.input == "builtin":
        from ettin.data.corpus import _all_documents, stdlib_root

        size = sum(len(t) for _, t in _all_documents(str(stdlib_root())))
    elif Path(cfg.input).expanduser().exists():
        size = sum(f.stat().st_size for f in input_files(Path(cfg.input).expanduser()))
    if size is not None:
        return max(1, min(cores or 1, -(-size // PROCESS_BYTES)))
    return max(1, cores or 1)


def _encoded_writer(**kwargs):
    """An ``MDSWriter`` that also takes samples already encoded (bytes) by the tokenizer processes."""
    from streaming import MDSWriter

    class EncodedMDSWriter(MDSWriter):
        def encode_sample(self, sample):
            return sample if isinstance(sample, bytes) else super().encode_sample(sample)

    return EncodedMDSWriter(**kwargs)


# ------------------------------------------------------------------------------------------------
# Preparing



def settings_of(cfg: PrepareConfig, tokenizer) -> dict:
    """What decides the content of a prepared folder (compared on every re-run)."""
    spec = cfg.input
    if spec != "builtin" and Path(spec).expanduser().exists():
        spec = str(Path(spec).expanduser().resolve())
    return {
        "format": FORMAT, "input": spec, "input_fingerprint": input_fingerprint(cfg.input),
        "max_seq_len": cfg.max_seq_len, "min_tail": cfg.min_tail,
        "validation_fraction": cfg.validation_fraction, "seed": cfg.seed,
        "text_column": cfg.text_column, "text_unit": cfg.text_unit, "hub_config": cfg.hub_config,
        "split": cfg.split, "max_documents": cfg.max_documents,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        # Only when not the defaults, so folders prepared before these settings existed still match.
        **({"chunking": cfg.chunking, "min_chunk_size": cfg.min_chunk_size,
            "always_skip_size": cfg.always_skip_size} if cfg.chunking != "balanced" else {}),
        **({"add_prefix_space": True} if cfg.add_prefix_space else {}),
    }


def write_folder(cfg: PrepareConfig, tokenizer, settings: dict, output: Path,
                 unit_results: Optional[Callable[[Skips], Iterator[UnitResult]]] = None) -> None:
    """Write ``output`` aside and publish it atomically (held under the output's lock)."""
    check_replaceable(output)
    with publishing(output) as temp:
        _write(cfg, tokenizer, settings, temp, unit_results)


def check_replaceable(output: Path) -> None:
    """A folder at ``output`` is replaced only if it holds nothing but a prepared folder's files."""
    if output.exists():
        ours = {"train", "validation", "tokenizer", "summary.json", COMPLETE}
        foreign = [p.name for p in output.iterdir() if p.name not in ours]
        if foreign:
            raise FileExistsError(
                f"{output} exists and holds files that are not a prepared folder's "
                f"({', '.join(sorted(foreign)[:5])}); choose another output folder"
            )


def sample_dtype(tokenizer) -> str:
    return "uint16" if len(tokenizer) <= 1 << 16 else "uint32"


def worker_settings(cfg: PrepareConfig, tokenizer) -> dict:
    """What the tokenizing processes need (``_init_worker``)."""
    ids = special_ids(tokenizer)
    return {"dtype": sample_dtype(tokenizer), "cls": ids.cls, "sep": ids.sep,
            "max_seq_len": cfg.max_seq_len, "min_tail": cfg.min_tail,
            "fraction": cfg.validation_fraction, "seed": cfg.seed, "chunking": cfg.chunking,
            "min_chunk_size": cfg.min_chunk_size, "always_skip_size": cfg.always_skip_size,
            "add_prefix_space": cfg.add_prefix_space}


def document_units(cfg: PrepareConfig, skips: Skips) -> Iterator[list[Document]]:
    """The input's documents in their fixed order, in tokenizing units."""
    documents: Iterable[Document] = read_documents(
        cfg.input, cfg.text_column, text_unit=cfg.text_unit, split=cfg.split,
        hub_config=cfg.hub_config, skips=skips, strict=cfg.strict)
    if cfg.max_documents is not None:
        documents = _take(documents, cfg.max_documents)
    return _units(documents)


def _write(cfg: PrepareConfig, tokenizer, settings: dict, temp: Path,
           unit_results: Optional[Callable[[Skips], Iterator[UnitResult]]] = None) -> None:
    """Tokenize, chunk and write ``temp``; ``unit_results`` (the executor's merge step) gives the
    tokenized units instead of the local processes."""
    started = time.perf_counter()
    temp.mkdir(parents=True)
    tokenizer.save_pretrained(str(temp / "tokenizer"))
    dtype = sample_dtype(tokenizer)
    skips = Skips()
    timings = {"read": 0.0, "tokenize": 0.0, "write": 0.0}
    processes = worker_count(cfg) if unit_results is None else cfg.tasks

    def units() -> Iterator[UnitResult]:
        if unit_results is not None:
            return unit_results(skips)
        return _ordered_map(_tokenize_unit, _timed(document_units(cfg, skips), timings, "read"),
                            processes, _init_worker,
                            (str(temp / "tokenizer" / "tokenizer.json"), worker_settings(cfg, tokenizer)))

    tally = _write_shards(cfg, temp, columns_for(dtype), units, skips, timings)
    timings["tokenize"] -= timings["read"]  # reading happens inside the wait for results
    arrays = tally.arrays()
    if not len(arrays["train"]):
        arrays = _train_on_validation(cfg, temp, columns_for(dtype), tally, arrays, skips)
    _finish_splits(temp, arrays, tally.stats)
    summary = _summary(cfg, tokenizer, settings, temp, tally, skips, dtype=dtype, processes=processes,
                       seconds=time.perf_counter() - started, timings=timings)
    (temp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (temp / COMPLETE).write_text(json.dumps({"format": FORMAT, "created": summary["created"]}) + "\n")


def _split_stats() -> dict:
    return {"documents": 0, "chunks": 0, "tokens": 0, "document_tokens": 0, "sources": {}}


@dataclass
class _Tally:
    """What the written units add up to: per split, the statistics summary.json reports and the chunk
    lengths lengths.npy holds; over both, the documents longer than a chunk and the tails rebalanced."""

    stats: dict = field(default_factory=lambda: {s: _split_stats() for s in SPLITS})
    lengths: dict = field(default_factory=lambda: {s: [] for s in SPLITS})
    rebalanced: int = 0
    long_documents: int = 0

    def add(self, result: UnitResult, skips: Skips) -> None:
        for split in SPLITS:
            sizes = result.lengths[split]
            self.lengths[split].append(sizes)
            s = self.stats[split]
            s["chunks"] += len(sizes)
            s["tokens"] += int(sizes.sum())
        for index, source, split, n_tokens, n_chunks, was_rebalanced, row_tokens in result.documents:
            if split is None:
                skips.document("no tokens after tokenization")
                continue
            s = self.stats[split]
            s["documents"] += 1
            s["document_tokens"] += n_tokens
            per_source = s["sources"].setdefault(source, {"documents": 0, "tokens": 0})
            per_source["documents"] += 1
            per_source["tokens"] += row_tokens
            self.long_documents += n_chunks > 1
            self.rebalanced += bool(was_rebalanced)

    def arrays(self) -> dict:
        return {s: np.concatenate(self.lengths[s]) if self.lengths[s] else np.zeros(0, np.int32)
                for s in SPLITS}

    def tokens(self) -> int:
        return int(sum(self.stats[s]["tokens"] for s in SPLITS))


def _write_shards(cfg: PrepareConfig, temp: Path, columns: dict, units: Callable[[], Iterator[UnitResult]],
                  skips: Skips, timings: dict) -> _Tally:
    """Every tokenized unit's samples into the train and validation shards, in document order."""
    from tqdm import tqdm

    tally = _Tally()
    size_limit = cfg.shard_size_mb << 20
    total = None
    if cfg.input == "builtin":
        from ettin.data.corpus import _all_documents, stdlib_root

        total = len(_all_documents(str(stdlib_root())))
    progress = tqdm(total=total, desc=f"tokenizing {cfg.input}", unit=" docs", dynamic_ncols=True,
                    disable=None if cfg.progress else True, file=sys.stderr)
    # sha256 of every shard in index.json (streaming's own field): checked when a run opens the
    # folder and by python -m ettin.data.verify.
    with _encoded_writer(columns=columns, out=str(temp / "train"), size_limit=size_limit,
                         hashes=SHARD_HASHES) as train, \
            _encoded_writer(columns=columns, out=str(temp / "validation"), size_limit=size_limit,
                            hashes=SHARD_HASHES) as val:
        writers = {"train": train, "validation": val}
        for result in _timed(units(), timings, "tokenize"):
            started_writing = time.perf_counter()
            for split in SPLITS:
                write = writers[split].write
                for sample in result.samples[split]:
                    write(sample)
            tally.add(result, skips)
            progress.update(len(result.documents))
            progress.set_postfix(tokens=f"{tally.tokens():,}")
            timings["write"] += time.perf_counter() - started_writing
        progress.close()
    return tally


def _train_on_validation(cfg: PrepareConfig, temp: Path, columns: dict, tally: _Tally, arrays: dict,
                         skips: Skips) -> dict:
    """No training chunks: a corpus of a single document (all of it drawn for validation) trains on
    it, with an empty validation split; no documents at all is an error. The split arrays after."""
    from streaming import MDSWriter

    if not len(arrays["validation"]):
        raise PrepareError(
            f"input {cfg.input!r} gave no documents to train on (skipped documents: "
            f"{skips.documents or 'none'}; skipped files: {len(skips.files)}"
            f"{': ' + ', '.join(list(skips.files)[:5]) if skips.files else ''})"
        )
    shutil.rmtree(temp / "train")
    os.replace(temp / "validation", temp / "train")
    MDSWriter(columns=columns, out=str(temp / "validation"), hashes=SHARD_HASHES).finish()
    tally.stats = {"train": tally.stats["validation"], "validation": _split_stats()}
    return {"train": arrays["validation"], "validation": np.zeros(0, np.int32)}


def _finish_splits(temp: Path, arrays: dict, stats: dict) -> None:
    """Each split's lengths.npy (checked against its shards' index), and its statistics condensed:
    a long list of sources summed up, the chunk lengths' range."""
    for split in SPLITS:
        np.save(temp / split / "lengths.npy", arrays[split].astype(np.int32))
        index = json.loads((temp / split / "index.json").read_text())
        assert sum(s["samples"] for s in index["shards"]) == len(arrays[split]), split
        sources = stats[split]["sources"]
        if len(sources) > MAX_LISTED:  # a per-file breakdown of a big folder is too long
            stats[split]["sources"] = {f"({len(sources)} files)": {
                "documents": sum(v["documents"] for v in sources.values()),
                "tokens": sum(v["tokens"] for v in sources.values())}}
        if len(arrays[split]):
            stats[split]["chunk_length"] = {"min": int(arrays[split].min()),
                                            "mean": round(float(arrays[split].mean()), 1),
                                            "max": int(arrays[split].max())}


def _summary(cfg: PrepareConfig, tokenizer, settings: dict, temp: Path, tally: _Tally, skips: Skips, *,
             dtype: str, processes: int, seconds: float, timings: dict) -> dict:
    """summary.json: the settings, the tokenizer, each split's statistics, the chunking, what was
    skipped, the bytes on disk and the time taken."""
    skipped_files = dict(list(skips.files.items())[:MAX_LISTED])
    if len(skips.files) > MAX_LISTED:
        skipped_files["..."] = f"{len(skips.files) - MAX_LISTED} more"
    summary = {
        "settings": settings,
        "tokenizer": {"source": cfg.tokenizer, "tokens": len(tokenizer),
                      "special_ids": {k: v for k, v in asdict(special_ids(tokenizer)).items() if k != "all"}},
        "splits": tally.stats,
        "chunking": {"max_seq_len": cfg.max_seq_len, "text_tokens_per_chunk": cfg.max_seq_len - 2,
                     "documents_longer_than_a_chunk": tally.long_documents,
                     "tails_rebalanced": tally.rebalanced, "dtype": dtype},
        "skipped": {"documents": skips.documents, "files": skipped_files,
                    "files_count": len(skips.files), "rows": skips.rows,
                    "rows_count": sum(entry["count"] for entry in skips.rows.values())},
        "bytes_on_disk": {s: _bytes(temp / s) for s in (*SPLITS, "tokenizer")},
        "seconds": round(seconds, 2),
        "seconds_in_main_process": {k: round(v, 2) for k, v in timings.items()},
        "tokens_per_second": round(tally.tokens() / max(seconds, 1e-9)),
        "num_proc": processes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    summary["bytes_on_disk"]["total"] = sum(summary["bytes_on_disk"].values())
    return summary


def _timed(items: Iterable, timings: dict, key: str) -> Iterator:
    """``items``, adding the time spent producing each to ``timings[key]``."""
    iterator = iter(items)
    while True:
        started = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            timings[key] += time.perf_counter() - started
            return
        timings[key] += time.perf_counter() - started
        yield item


def _take(documents: Iterable[Document], count: int) -> Iterator[Document]:
    for document in documents:
        if document.index >= count:
            return
        yield document


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

