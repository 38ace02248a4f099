"""Bad input gives a clear error naming the problem and the fix, or a counted skip in the summary;
never a silent truncation or a hang."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from data_fixtures import TINY_SEQ_LEN, data_root, tiny_prepared, tiny_tokenizer  # noqa: F401

from ettin.objectives.collate import MLMCollator
from ettin.data.loader import PreparedSplit, StepBatches
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
    assert list(summary(out)["skipped"]["files"]) == [str(corpus / "b.jsonl")]
    with pytest.raises(PrepareError, match="cannot read .*b.jsonl"):
        prepare(input=str(corpus), output=str(tmp_path / "o2"), tokenizer=str(tiny_tokenizer),
                max_seq_len=64, num_proc=1, progress=False, strict=True)
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(PrepareError, match=r"no column 'text' \(columns: body\); set text_column"):
        prepare(input=str(tmp_path / "c.jsonl"), output=str(tmp_path / "o3"),
                tokenizer=str(tiny_tokenizer), max_seq_len=64, num_proc=1, progress=False)


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
    split = PreparedSplit(folder, "train")
    with pytest.raises(ValueError, match="sample 0 .*(corrupt|cannot be decoded).*prepare it again"):
        split.tokens(0)
    data[0:4] = np.uint32(1).tobytes()  # the sample count in the header
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt header"):
        PreparedSplit(folder, "train").tokens(1)
    (folder / "train" / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        PreparedSplit(folder, "train")


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
