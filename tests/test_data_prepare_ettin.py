"""prepare=ettin: Ettin's chunker (split_dataset_into_chunks_individual.py with --backfill
--backfill_no_duplicates) and tokenization (add_prefix_space), against a transcription of it."""

from __future__ import annotations

import json

import numpy as np
from data_fixtures import data_root, tiny_tokenizer  # noqa: F401

from ettin.data.formats import PreparedSplit
from ettin.data.shards import ettin_chunks
from ettin.data.prepare import main

CLS, SEP = 0, 1


def reference(tokens, chunk_size, min_chunk, always_skip, rng):
    """Ettin's chunk_instance, as its script reads (the random draw: randint(0, C - len))."""
    c = chunk_size - 2
    pieces = [list(tokens[i:i + c]) for i in range(0, len(tokens), c)]
    chunks = []
    for i, piece in enumerate(pieces):
        if len(piece) < always_skip and i != 0:
            continue
        if len(piece) < min_chunk and chunks:
            r = int(rng.integers(0, c - len(piece)))
            if r:
                piece = chunks[-1][-r:] + piece
                chunks[-1] = chunks[-1][:-r]
        chunks.append(piece)
    return [ch if ch[0] == CLS else [CLS] + ch for ch in chunks]


def test_chunks_equal_ettins_chunker():
    for n in [3, 10, 30, 31, 32, 45, 47, 50, 62, 64, 100, 301]:
        tokens = np.array([CLS, *range(5, 5 + n - 2), SEP], dtype=np.uint32)
        for seed in range(5):
            got, dropped = ettin_chunks(tokens, 32, CLS, 12, 4, np.random.default_rng(seed))
            want = reference(tokens.tolist(), 32, 12, 4, np.random.default_rng(seed))
            assert [c.tolist() for c in got] == want
            kept = want[0] + [t for c in want[1:] for t in c[1:]]  # without the inserted [CLS]
            assert kept == tokens.tolist()[:len(tokens) - dropped]  # nothing repeated or reordered
            assert all(len(c) <= 31 for c in got) and (dropped or got[-1][-1] == SEP)


def test_prepare_ettin_preset(tmp_path, tiny_tokenizer):
    out = tmp_path / "ettin"
    assert main(["input=builtin", f"output={out}", f"tokenizer={tiny_tokenizer}", "max_seq_len=64",
                 "max_documents=60", "num_proc=1", "progress=false", "prepare=ettin",
                 "min_chunk_size=24", "always_skip_size=8"]) == 0
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["chunking"] == "ettin" and settings["add_prefix_space"] is True
    assert settings["validation_fraction"] == 0.001
    split = PreparedSplit(out, "train")
    rows = [split.tokens(i).tolist() for i in range(len(split))]
    assert all(r[0] == CLS and len(r) <= 63 for r in rows)
    assert any(len(r) < 24 for r in rows)  # short first chunks are kept
    # a prefix space: the first text token of each document differs from the default preparation
    plain = tmp_path / "plain"
    assert main(["input=builtin", f"output={plain}", f"tokenizer={tiny_tokenizer}", "max_seq_len=64",
                 "max_documents=60", "num_proc=1", "progress=false", "validation_fraction=0.001"]) == 0
    default = PreparedSplit(plain, "train")
    assert split.tokens(0)[1] != default.tokens(0)[1]
