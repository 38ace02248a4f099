"""Small, fast data fixtures: a tiny tokenizer and tiny prepared folders, built once per session.

Import the fixtures into a test module (``from data_fixtures import tiny_tokenizer, ...``). The
builders cache their results per session, so several modules importing them build them once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

_CACHE: dict = {}

TINY_VOCAB = 512
TINY_SEQ_LEN = 64


def build_tiny_tokenizer(root: Path) -> Path:
    """A 512-token byte-level BPE trained on the first ~200k characters of the built-in corpus."""
    if "tokenizer" not in _CACHE:
        from ettin.data.corpus import builtin_documents
        from ettin.data.tokenizer import train_tokenizer

        path = root / "tiny-tokenizer"
        train_tokenizer((t for _, t in builtin_documents(max_chars=200_000)), TINY_VOCAB, path)
        _CACHE["tokenizer"] = path
    return _CACHE["tokenizer"]


def write_mixed_corpus(folder: Path) -> list[str]:
    """A folder with one file of each supported kind; returns the documents in reading order
    (files sorted by name; a .txt file is one document)."""
    import pandas as pd

    from ettin.data.corpus import builtin_documents

    texts = [t for _, t in builtin_documents()][100:230]  # docstrings of varied lengths
    folder.mkdir(parents=True, exist_ok=True)
    parts = [texts[0:10], texts[10:40], texts[40:70], texts[70:100], texts[100:]]
    (folder / "a.txt").write_text(parts[0][0], encoding="utf-8")
    with (folder / "b.jsonl").open("w", encoding="utf-8") as f:
        for text in parts[1]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n")
    pd.DataFrame({"text": parts[2]}).to_parquet(folder / "c.parquet")
    pd.DataFrame({"text": parts[3], "other": 1}).to_csv(folder / "d.csv", index=False)
    (folder / "e.json").write_text(json.dumps([{"text": t} for t in parts[4]]), encoding="utf-8")
    return [parts[0][0], *parts[1], *parts[2], *parts[3], *parts[4]]


def build_tiny_prepared(root: Path, name: str = "tiny-prepared", **fields) -> Path:
    """The built-in corpus (first 300 documents) prepared at 64 tokens with the tiny tokenizer."""
    key = (name, tuple(sorted(fields.items())))
    if key not in _CACHE:
        from ettin.data.prepare import prepare

        settings = dict(input="builtin", max_documents=300, max_seq_len=TINY_SEQ_LEN,
                        validation_fraction=0.05, num_proc=1, progress=False)
        settings.update(fields)
        _CACHE[key] = prepare(output=str(root / name), tokenizer=str(build_tiny_tokenizer(root)),
                              **settings)
    return _CACHE[key]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    if "root" not in _CACHE:
        _CACHE["root"] = tmp_path_factory.mktemp("ettin-data")
    return _CACHE["root"]


@pytest.fixture(scope="session")
def tiny_tokenizer(data_root) -> Path:
    """Folder of a 512-token BPE with [CLS] [SEP] [PAD] [MASK] [UNK]."""
    return build_tiny_tokenizer(data_root)


@pytest.fixture(scope="session")
def tiny_prepared(data_root) -> Path:
    """A finished prepared folder: ~300 built-in documents, chunks of at most 64 tokens."""
    return build_tiny_prepared(data_root)


@pytest.fixture(scope="session")
def tiny_prepared_long(data_root) -> Path:
    """Another source for mixtures: the first 600 built-in documents at 128 tokens (its mean sample
    length differs from tiny_prepared's)."""
    return build_tiny_prepared(data_root, "tiny-prepared-long", max_documents=600, max_seq_len=128)


def write_released_layout(root: Path, rows: dict, parts: int = 2, compression: str = "zstd",
                          hashes=None) -> Path:
    """train/ and validation/ splits, each of ``parts`` sub-folders written by streaming's
    ``MDSWriter`` (columns ``input_ids`` ndarray:uint32 and ``id`` str, ``compression``) whose
    indexes are merged into ``<split>/index.json`` (streaming's ``merge_index``, as Ettin merged its
    folders to train on them), and a root index merging the splits.
    ``rows``: split -> list of token id lists, written in order (part k takes the k-th slice)."""
    import numpy as np
    from streaming import MDSWriter
    from streaming.base.util import merge_index

    columns = {"input_ids": "ndarray:uint32", "id": "str"}
    for split, split_rows in rows.items():
        bounds = np.linspace(0, len(split_rows), parts + 1).astype(int)
        for part in range(parts):
            with MDSWriter(out=str(root / split / f"part_{part}"), columns=columns,
                           compression=compression, hashes=hashes, size_limit=1 << 12) as writer:
                for i in range(bounds[part], bounds[part + 1]):
                    writer.write({"input_ids": np.asarray(split_rows[i], dtype=np.uint32),
                                  "id": f"{split}-{i}"})
        merge_index(str(root / split), keep_local=True)
    merge_index([str(root / s / "index.json") for s in rows], str(root), keep_local=True)
    return root


def released_rows(tokenizer_dir: Path, documents: int = 40, seq_len: int = TINY_SEQ_LEN) -> dict:
    """Rows as Ettin's chunker leaves them, from the built-in corpus and the tiny tokenizer:
    [CLS] ... with [SEP] at a document's end; every 7th row lacks its [CLS] and every 11th is
    longer than ``seq_len`` (Ettin's loader adds the one and cuts the other)."""
    from ettin.data.corpus import builtin_documents
    from ettin.data.tokenizer import load_tokenizer, special_ids

    tokenizer = load_tokenizer(tokenizer_dir)
    ids = special_ids(tokenizer)
    texts = [t for _, t in builtin_documents()][:documents]
    rows = []
    for n, text in enumerate(texts):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        width = seq_len + 9 if n % 11 == 0 else seq_len - 2
        for start in range(0, len(tokens), width):
            piece = tokens[start:start + width]
            row = [ids.cls, *piece] + ([ids.sep] if start + width >= len(tokens) else [])
            rows.append(row[1:] if len(rows) % 7 == 3 else row)
    return {"train": rows[: len(rows) * 9 // 10], "validation": rows[len(rows) * 9 // 10:]}


def write_published_mds(root: Path, sources: dict, parts: int = 2, seq_len: int = TINY_SEQ_LEN,
                        compression=None) -> Path:
    """Ettin's released MDS data as it is published, written with streaming's ``MDSWriter``: per
    source, ``parts`` split folders ``train/<source>/split_<NN>-tokenized-chunked-<seq_len>/``, each
    with its own ``index.json`` and shards (``input_ids`` ndarray:uint32, ``id`` str, uncompressed
    by default), and NO merged index above them, nor a validation split. ``sources``: source name
    -> list of token id lists, written in order (split folder k takes the k-th slice)."""
    import numpy as np
    from streaming import MDSWriter

    columns = {"input_ids": "ndarray:uint32", "id": "str"}
    for source, rows in sources.items():
        bounds = np.linspace(0, len(rows), parts + 1).astype(int)
        for part in range(parts):
            folder = root / "train" / source / f"split_{part:02d}-tokenized-chunked-{seq_len}"
            with MDSWriter(out=str(folder), columns=columns, compression=compression,
                           size_limit=1 << 12) as writer:
                for i in range(bounds[part], bounds[part + 1]):
                    writer.write({"input_ids": np.asarray(rows[i], dtype=np.uint32),
                                  "id": f"{source}-{i}"})
    return root
