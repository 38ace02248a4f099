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
