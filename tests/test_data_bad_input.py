"""Bad input gives a clear error naming the problem and the fix, or a counted skip in the summary;
never a silent truncation or a hang."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from data_fixtures import TINY_SEQ_LEN, data_root, tiny_prepared, tiny_tokenizer  # noqa: F401

from ettin.objectives.collate import MLMCollator
from ettin.data.formats import PreparedSplit
from ettin.data.loader import StepBatches
from ettin.data.reading import PrepareError
from ettin.data.prepare import prepare, require_prepared
from ettin.data.tokenizer import SpecialIds, check_vocab, load_tokenizer, special_ids


def run(tmp_path, tiny_tokenizer, source, **kwargs):
    return prepare(input=str(source), output=str(tmp_path / "out"), tokenizer=str(tiny_tokenizer),
                   max_seq_len=64, num_proc=1, progress=False, **kwargs)


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


def test_missing_input(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist.*input=builtin"):
        run(tmp_path, tiny_tokenizer, tmp_path / "no" / "such.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="it is empty"):
        run(tmp_path, tiny_tokenizer, tmp_path / "empty")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(FileNotFoundError, match=r"found only: \.png"):
        run(tmp_path, tiny_tokenizer, tmp_path / "images")
    assert not (tmp_path / "out").exists()


def test_non_utf8_text_is_a_counted_skip_or_an_error(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("A perfectly good document. " * 10)
    (corpus / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me, na\xefve".encode("latin-1"))
    out = run(tmp_path, tiny_tokenizer, corpus, validation_fraction=0.0)
    skipped = summary(out)["skipped"]
    assert skipped["files_count"] == 1
    assert "not UTF-8" in skipped["files"][str(corpus / "latin1.txt")]
    assert summary(out)["splits"]["train"]["documents"] == 1
    with pytest.raises(PrepareError, match="latin1.txt: not UTF-8.*strict=false"):
        prepare(input=str(corpus), output=str(tmp_path / "strict"), tokenizer=str(tiny_tokenizer),
                max_seq_len=64, num_proc=1, progress=False, strict=True)


def test_empty_documents_are_counted(tmp_path, tiny_tokenizer):
    rows = [{"text": "real text here"}, {"text": ""}, {"text": "   \n "}, {"text": None},
            {"text": 42}, {"text": "more real text"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run(tmp_path, tiny_tokenizer, tmp_path / "d.jsonl", validation_fraction=0.0)
    assert summary(out)["skipped"]["documents"] == {"empty document": 3, "not a string (int)": 1}
    assert summary(out)["splits"]["train"]["documents"] == 2


def test_nothing_to_train_on_is_an_error(tmp_path, tiny_tokenizer):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(PrepareError, match="no documents to train on.*empty document"):
        run(tmp_path, tiny_tokenizer, tmp_path / "d.jsonl")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_malformed_and_unusable_tables(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (corpus / "b.jsonl").write_text('{"text": "broken",\n')
    out = run(tmp_path, tiny_tokenizer, corpus, validation_fraction=0.0)
    assert list(summary(out)["skipped"]["rows"]) == [str(corpus / "b.jsonl")]
    with pytest.raises(PrepareError, match="b.jsonl line 1: not JSON.*strict=false"):
        prepare(input=str(corpus), output=str(tmp_path / "o2"), tokenizer=str(tiny_tokenizer),
                max_seq_len=64, num_proc=1, progress=False, strict=True)
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(PrepareError, match=r"no column 'text' \(columns: body\); set text_column"):
        prepare(input=str(tmp_path / "c.jsonl"), output=str(tmp_path / "o3"),
                tokenizer=str(tiny_tokenizer), max_seq_len=64, num_proc=1, progress=False)


def test_malformed_rows_are_skipped_counted_and_named_by_file_and_line_and_the_rest_kept(
        tmp_path, tiny_tokenizer, capsys):
    from ettin.data.prepare import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = [f"document number {n} has some words in it" for n in range(6)]
    lines = [json.dumps({"text": good[0]}).encode(), json.dumps({"text": good[1]}).encode(),
             b'{"text": "broken",', b'{"text": "caf\xe9"}', b'["a", "list"]',
             json.dumps({"text": good[2]}).encode()]
    (corpus / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (corpus / "b.csv").write_text(
        f'text,id\n{good[3]},1\n"two\nlines, quoted",2\nan extra,field,3\n{good[4]},4\n'
        f'too few\n{good[5]},6\n')
    out = tmp_path / "out"
    assert main([f"input={corpus}", f"output={out}", f"tokenizer={tiny_tokenizer}",
                 "max_seq_len=64", "num_proc=1", "progress=false", "validation_fraction=0"]) == 0
    skipped = summary(out)["skipped"]
    assert {f: sorted(r["lines"]) for f, r in skipped["rows"].items()} == {
        str(corpus / "a.jsonl"): ["3", "4", "5"], str(corpus / "b.csv"): ["5", "7"]}
    assert skipped["rows"][str(corpus / "a.jsonl")]["lines"]["4"].startswith("not UTF-8")
    assert skipped["rows"][str(corpus / "b.csv")]["lines"]["5"] == "3 fields where the header has 2"
    assert skipped["rows_count"] == 5 and skipped["files_count"] == 0
    # Every good row, also those after a bad one, was prepared: 3 + 4 documents.
    sources = summary(out)["splits"]["train"]["sources"]
    assert {k: v["documents"] for k, v in sources.items()} == {"a.jsonl": 3, "b.csv": 4}
    printed = capsys.readouterr()
    assert f"skipped 3 malformed rows of {corpus / 'a.jsonl'} (lines 3, 4, 5)" in printed.out
    assert f"skipped 2 malformed rows of {corpus / 'b.csv'} (lines 5, 7)" in printed.out
    assert f"warning: skipped {corpus / 'b.csv'} line 7: 1 fields" in printed.err


def test_bad_settings(tmp_path, tiny_tokenizer):
    with pytest.raises(PrepareError, match="max_seq_len=2 must be at least 3"):
        prepare(input="builtin", output=str(tmp_path / "x"), tokenizer=str(tiny_tokenizer),
                max_seq_len=2)
    with pytest.raises(PrepareError, match="output=... is required"):
        prepare(input="builtin", tokenizer=str(tiny_tokenizer))
    with pytest.raises(PrepareError, match="text_unit"):
        run(tmp_path, tiny_tokenizer, "builtin", text_unit="sentence")


def test_tokenizer_larger_than_the_model(tiny_tokenizer):
    with pytest.raises(ValueError, match="ids >= 300 would index past the embedding table"):
        check_vocab(load_tokenizer(tiny_tokenizer), 300)


def copy_of(prepared, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(prepared, target)
    return target


def test_truncated_shard(tmp_path, tiny_prepared):
    folder = copy_of(tiny_prepared, tmp_path)
    shard = next((folder / "train").glob("*.mds"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"shard .* has .* bytes instead of .*truncated.*"
                                         r"delete it and prepare it again: python -m ettin.data.prepare "
                                         r"input=builtin"):
        PreparedSplit(folder, "train")
    shard.unlink()
    with pytest.raises(ValueError, match="is missing"):
        PreparedSplit(folder, "train")


def test_corrupt_shard_bytes(tmp_path, tiny_prepared):
    folder = copy_of(tiny_prepared, tmp_path)
    shard = next((folder / "train").glob("*.mds"))
    data = bytearray(shard.read_bytes())
    (begin,) = np.frombuffer(bytes(data[4:8]), np.uint32)  # sample 0 starts here
    data[begin + 4 + 8 + 1] ^= 0xFF  # its length field (after the size header and doc_id)
    shard.write_bytes(bytes(data))
    split = PreparedSplit(folder, "train", check_hashes=False)  # the reader's own checks
    with pytest.raises(ValueError, match="sample 0 .*(corrupt|cannot be decoded).*prepare it again"):
        split.tokens(0)
    data[0:4] = np.uint32(1).tobytes()  # the sample count in the header
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt header"):
        PreparedSplit(folder, "train", check_hashes=False).tokens(1)
    (folder / "train" / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        PreparedSplit(folder, "train")


def shift_a_token_id(shard):
    """Token id + 1 in sample 0 of ``shard``: the same length, the same size, other ids."""
    data = bytearray(shard.read_bytes())
    (begin,) = np.frombuffer(bytes(data[4:8]), np.uint32)
    position = begin + 4 + 8 + 1 + 1 + 2  # size header, doc_id, shape header, n (uint8), ids[1]
    data[position] += 1
    shard.write_bytes(bytes(data))


def test_prepared_shards_carry_the_sha256_of_their_bytes(tiny_prepared):
    import hashlib

    for split in ("train", "validation"):
        index = json.loads((tiny_prepared / split / "index.json").read_text())
        for shard in index["shards"]:
            data = (tiny_prepared / split / shard["raw_data"]["basename"]).read_bytes()
            assert shard["raw_data"]["hashes"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_shard_with_shifted_token_ids_is_refused_at_start_and_by_verify(
        tmp_path, tiny_prepared, monkeypatch, capsys):
    from ettin.data.verify import main as verify

    monkeypatch.setenv("ETTIN_CACHE_DIR", str(tmp_path / "cache"))
    folder = copy_of(tiny_prepared, tmp_path)
    assert verify([str(folder)]) == 0 and "every sha256 matches" in capsys.readouterr().out
    shard = next((folder / "train").glob("*.mds"))
    ids_before = PreparedSplit(folder, "train").tokens(0).copy()
    shift_a_token_id(shard)
    assert PreparedSplit(folder, "train", check_hashes=False).tokens(0)[1] == ids_before[1] + 1
    damaged = (rf"shard {shard} does not have the sha256 its index lists .*delete it and "
               r"prepare it again: python -m ettin.data.prepare input=builtin")
    with pytest.raises(ValueError, match=damaged):
        PreparedSplit(folder, "train")
    assert verify([str(folder)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: shard") and len(error.strip().splitlines()) == 1


def test_a_run_start_rehashes_only_shards_changed_since_checked_and_verify_rehashes_all(
        tmp_path, tiny_prepared, monkeypatch):
    from ettin.data.verify import main as verify

    monkeypatch.setenv("ETTIN_CACHE_DIR", str(tmp_path / "cache"))
    folder = copy_of(tiny_prepared, tmp_path)
    total = sum(f.stat().st_size for f in (folder / "train").glob("*.mds"))
    assert PreparedSplit(folder, "train", check_hashes=False).verify_hashes() == total
    assert PreparedSplit(folder, "train", check_hashes=False).verify_hashes() == 0  # recorded
    # Bytes changed behind the record's back (same size and time): only verify reads them again.
    shard = next((folder / "train").glob("*.mds"))
    stat = shard.stat()
    shift_a_token_id(shard)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    PreparedSplit(folder, "train")
    assert verify([str(folder)]) == 2


def test_missing_prepared_data_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=r"does not exist\. Prepare it with: python -m ettin.data.prepare "
                             r"input=YOUR_TEXT output=.*nowhere tokenizer=TOKENIZER max_seq_len=128"):
        require_prepared(tmp_path / "nowhere", 128)
    (tmp_path / "random").mkdir()
    with pytest.raises(FileNotFoundError, match="not a prepared folder"):
        StepBatches(tmp_path / "random", seq_len=64, collator=lambda s: s,
                    global_batch_at=lambda t: 2, micro_batch_size=1)


def test_sequence_length_longer_than_the_phase(tiny_prepared, tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    collate = MLMCollator(special_ids(tokenizer), len(tokenizer), 0.3, 0)
    with pytest.raises(ValueError, match=f"up to {TINY_SEQ_LEN} tokens but the sequence length is 16"
                                         ".*max_seq_len=16"):
        StepBatches(tiny_prepared, seq_len=16, collator=collate, global_batch_at=lambda t: 2,
                    micro_batch_size=1)


def test_data_prepared_with_another_tokenizer(tiny_prepared, tiny_tokenizer):
    ids = special_ids(load_tokenizer(tiny_tokenizer))
    other = SpecialIds(cls=ids.sep, sep=ids.cls, pad=ids.pad, mask=ids.mask, unk=ids.unk, all=ids.all)
    collate = MLMCollator(other, 512, 0.3, 0)
    with pytest.raises(ValueError, match="prepared with cls=0 but the training tokenizer has cls=1"):
        StepBatches(tiny_prepared, seq_len=TINY_SEQ_LEN, collator=collate,
                    global_batch_at=lambda t: 2, micro_batch_size=1)
