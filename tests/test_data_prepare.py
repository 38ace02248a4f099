"""python -m ettin.data.prepare: every document comes back from the shards, chunking loses and
duplicates nothing, re-runs are idempotent, and a half-written folder is never taken as finished."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import (TINY_SEQ_LEN, build_tiny_prepared, data_root, tiny_prepared,  # noqa: F401
                           tiny_tokenizer, write_mixed_corpus)

from ettin.data.formats import PreparedSplit
from ettin.data.prepare import ensure_prepared, main, prepare, require_prepared
from ettin.store.fs import COMPLETE, is_complete
from ettin.data.shards import chunk_bounds, chunk_document, columns_for, encode_sample
from ettin.data.reading import read_documents
from ettin.data.tokenizer import load_tokenizer, special_ids


def documents_of(folder: Path, tokenizer) -> dict[int, str]:
    """doc_id -> decoded text, from every sample of both splits (chunks in stored order)."""
    from streaming import LocalDataset  # the library's own reader: the shards are standard MDS

    ids = special_ids(tokenizer)
    pieces: dict[int, list[np.ndarray]] = defaultdict(list)
    for split in ("train", "validation"):
        dataset = LocalDataset(str(folder), split=split)
        ours = PreparedSplit(folder, split)
        assert len(dataset) == len(ours)
        for i in range(len(dataset)):
            sample = dataset.get_item(i)
            tokens = sample["input_ids"]
            assert np.array_equal(tokens, ours.tokens(i))
            assert tokens[0] == ids.cls and ids.cls not in tokens[1:].tolist()
            pieces[int(sample["doc_id"])].append(tokens)
    texts = {}
    for doc_id, chunks in pieces.items():
        # [SEP] closes only the last chunk of a document.
        assert [int(c[-1] == ids.sep) for c in chunks] == [0] * (len(chunks) - 1) + [1]
        body = np.concatenate([c[1:] for c in chunks])[:-1]
        assert ids.sep not in body.tolist()
        texts[doc_id] = tokenizer.decode(body.tolist())
    return texts


def test_decoding_the_shards_gives_back_every_document(tmp_path, tiny_tokenizer):
    expected = write_mixed_corpus(tmp_path / "corpus")
    tokenizer = load_tokenizer(tiny_tokenizer)
    out = prepare(input=str(tmp_path / "corpus"), output=str(tmp_path / "out"),
                  tokenizer=str(tiny_tokenizer), max_seq_len=48, validation_fraction=0.2,
                  num_proc=1, progress=False)
    texts = documents_of(out, tokenizer)
    assert [texts[i] for i in range(len(expected))] == expected
    summary = json.loads((out / "summary.json").read_text())
    splits = summary["splits"]
    assert splits["train"]["documents"] + splits["validation"]["documents"] == len(expected)
    assert splits["validation"]["documents"] >= 1
    assert set(splits["train"]["sources"]) | set(splits["validation"]["sources"]) == {
        "a.txt", "b.jsonl", "c.parquet", "d.csv", "e.json"}
    for split in ("train", "validation"):
        lengths = np.load(out / split / "lengths.npy")
        assert lengths.max() <= 48 and splits[split]["tokens"] == int(lengths.sum())
        assert sum(v["tokens"] for v in splits[split]["sources"].values()) == int(lengths.sum())
    assert summary["bytes_on_disk"]["total"] > 0 and summary["skipped"]["documents"] == {}
    assert (out / "tokenizer" / "tokenizer.json").exists() and is_complete(out)


@pytest.mark.parametrize("max_seq_len", [3, 4, 7, 64, 1024])
def test_chunking_loses_and_duplicates_no_token(max_seq_len):
    rng = np.random.default_rng(max_seq_len)
    capacity = max_seq_len - 2
    for n in [*range(1, 3 * capacity + 3), *rng.integers(1, 20 * capacity, 50).tolist()]:
        for min_tail in (0, 512):
            bounds = chunk_bounds(n, max_seq_len, min_tail)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous: no gap/overlap
            assert all(0 < b - a <= capacity for a, b in bounds)
            assert len(bounds) == -(-n // capacity)  # as few chunks as possible
            if len(bounds) > 1 and min_tail:
                assert bounds[-1][1] - bounds[-1][0] >= min(min_tail, capacity // 2)
        ids = np.arange(100, 100 + n, dtype=np.uint32)
        chunks = chunk_document(ids, max_seq_len, cls=1, sep=2, min_tail=512)
        assert all(c[0] == 1 and len(c) <= max_seq_len for c in chunks)
        assert chunks[-1][-1] == 2 and all(len(c) <= max_seq_len - 1 for c in chunks[:-1])
        restored = np.concatenate([c[1:] for c in chunks])[:-1]
        assert np.array_equal(restored, ids)


def test_prepared_chunks_follow_the_contract(tiny_prepared, tiny_tokenizer):
    ids = special_ids(load_tokenizer(tiny_tokenizer))
    summary = json.loads((tiny_prepared / "summary.json").read_text())
    for split in ("train", "validation"):
        data = PreparedSplit(tiny_prepared, split)
        lengths = np.load(tiny_prepared / split / "lengths.npy")
        assert len(data) == len(lengths) > 0
        tokens = [data.tokens(i) for i in range(len(data))]
        assert [len(t) for t in tokens] == lengths.tolist()
        assert all(t[0] == ids.cls and len(t) <= TINY_SEQ_LEN for t in tokens)
        # Documents longer than a chunk: middle chunks leave one slot for an encoder's [SEP].
        assert all(len(t) <= TINY_SEQ_LEN - 1 for t in tokens if t[-1] != ids.sep)
        assert summary["splits"][split]["chunks"] == len(data)
    assert summary["chunking"]["documents_longer_than_a_chunk"] > 0
    assert summary["chunking"]["tails_rebalanced"] > 0


def test_rerun_is_idempotent_and_other_settings_are_refused(tmp_path, tiny_tokenizer):
    args = dict(input="builtin", output=str(tmp_path / "p"), tokenizer=str(tiny_tokenizer),
                max_seq_len=64, max_documents=20, num_proc=1, progress=False)
    out = prepare(**args)
    stamp = (out / COMPLETE).stat().st_mtime_ns
    assert prepare(**args) == out and (out / COMPLETE).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="max_seq_len: 64 -> 128"):
        prepare(**{**args, "max_seq_len": 128})
    prepare(**{**args, "max_seq_len": 128, "overwrite": True})
    assert json.loads((out / "summary.json").read_text())["settings"]["max_seq_len"] == 128
    assert not list(tmp_path.glob(".p.tmp-*")) and not list(tmp_path.glob(".p.old-*"))


def test_half_written_output_is_never_taken_as_finished(tmp_path, tiny_tokenizer):
    out = tmp_path / "p"
    args = dict(input="builtin", output=str(out), tokenizer=str(tiny_tokenizer), max_seq_len=64,
                max_documents=20, num_proc=1, progress=False)
    prepare(**args)
    reference = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / COMPLETE).unlink()  # as if killed before the end
    (tmp_path / ".p.tmp-999999").mkdir()  # a crashed attempt's leftovers
    with pytest.raises(FileNotFoundError, match="unfinished.*python -m ettin.data.prepare"):
        require_prepared(out)
    with pytest.raises(FileNotFoundError, match="unfinished"):
        PreparedSplit(out, "train")
    prepare(**args)
    assert is_complete(out) and not (tmp_path / ".p.tmp-999999").exists()
    again = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert again.keys() == reference.keys()
    for name in reference:  # deterministic output (the summary carries times)
        if name.name not in ("summary.json", COMPLETE):
            assert again[name] == reference[name], name


@pytest.mark.slow
def test_output_does_not_depend_on_the_number_of_processes(data_root, tiny_prepared):
    two = build_tiny_prepared(data_root, "tiny-prepared-2proc", num_proc=2)
    for split in ("train", "validation"):
        files = sorted(p.name for p in (tiny_prepared / split).iterdir())
        assert files == sorted(p.name for p in (two / split).iterdir())
        for name in files:
            assert (tiny_prepared / split / name).read_bytes() == (two / split / name).read_bytes()


def test_special_token_strings_in_text_are_plain_text(tmp_path, tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    ids = special_ids(tokenizer)
    text = "Use [MASK] and [CLS] and [SEP] and [PAD] as words, [unused3] too."
    (tmp_path / "doc.txt").write_text(text)
    out = prepare(input=str(tmp_path / "doc.txt"), output=str(tmp_path / "p"),
                  tokenizer=str(tiny_tokenizer), max_seq_len=512, validation_fraction=0.0,
                  num_proc=1, progress=False)
    tokens = PreparedSplit(out, "train").tokens(0)
    assert tokens[0] == ids.cls and tokens[-1] == ids.sep
    assert not set(tokens[1:-1].tolist()) & ids.all
    assert tokenizer.decode(tokens[1:-1].tolist()) == text


def test_text_units_and_read_order(tmp_path):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("one\n\n  \ntwo\nthree")
    (tmp_path / ".hidden.txt").write_text("never read")
    docs = lambda unit: [d.text for d in read_documents(str(tmp_path), text_unit=unit)]  # noqa: E731
    assert docs("document") == ["one\n\n  \ntwo\nthree", "second file"]
    assert docs("paragraph") == ["one", "two\nthree", "second file"]
    assert docs("line") == ["one", "two", "three", "second file"]


def test_mds_samples_are_encoded_as_streaming_encodes_them(tmp_path):
    from streaming import MDSWriter

    for dtype in ("uint16", "uint32"):
        writer = MDSWriter(columns=columns_for(dtype), out=str(tmp_path / dtype))
        for n in (1, 255, 256, 70_000):
            chunk = np.arange(n, dtype=dtype)
            assert writer.encode_sample({"input_ids": chunk, "doc_id": 7}) == encode_sample(chunk, 7)


def test_cli(tmp_path, tiny_tokenizer, capsys):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"body": f"text number {i} " * 9}) + "\n"
                                              for i in range(40)))
    args = [f"input={tmp_path / 't.jsonl'}", f"output={tmp_path / 'out'}",
            f"tokenizer={tiny_tokenizer}", "max_seq_len=32", "text_column=body", "num_proc=1"]
    assert main(args) == 0
    assert "prepared" in capsys.readouterr().out
    assert main(args) == 0  # idempotent
    assert main([*args, "no_such_key=1"]) == 2
    assert main([f"input={tmp_path / 'missing'}", f"output={tmp_path / 'o2'}",
                 f"tokenizer={tiny_tokenizer}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ensure_prepared_returns_a_finished_folder_and_waits_for_one(tmp_path, tiny_prepared,
                                                                    tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    assert ensure_prepared(input="builtin", output=tiny_prepared, tokenizer=tokenizer,
                           max_seq_len=TINY_SEQ_LEN, max_documents=300,
                           validation_fraction=0.05) == tiny_prepared
    assert ensure_prepared(input="builtin", output=tiny_prepared, tokenizer=tokenizer,
                           max_seq_len=TINY_SEQ_LEN, wait=True) == tiny_prepared
    with pytest.raises(TimeoutError):
        ensure_prepared(input="builtin", output=tmp_path / "never", tokenizer=tokenizer,
                        max_seq_len=64, wait=True, timeout_s=0.1)


def _prepare_in_process(args):
    from ettin.data.prepare import prepare as run

    return str(run(**args))


def test_two_processes_preparing_one_folder_do_not_collide(tmp_path, tiny_tokenizer):
    import multiprocessing

    args = dict(input="builtin", output=str(tmp_path / "shared"), tokenizer=str(tiny_tokenizer),
                max_seq_len=64, max_documents=200, num_proc=1, progress=False)
    with multiprocessing.get_context("fork").Pool(2) as pool:  # fork: no second import of torch
        results = pool.map(_prepare_in_process, [args, args])
    assert results[0] == results[1] and is_complete(results[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared", "shared.lock"]
    assert len(PreparedSplit(results[0], "train")) > 0


def test_builtin_corpus_is_deterministic_and_sizeable():
    from ettin.data.corpus import builtin_documents, describe

    first = list(builtin_documents())
    assert first == list(builtin_documents())
    assert sum(len(t) for _, t in first) > 1_000_000 and len(first) > 1000
    assert len({name for name, _ in first}) == len(first)
    assert "documents" in describe()
