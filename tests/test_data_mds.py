"""MDS data in the layouts Ettin publishes, written with streaming's own MDSWriter: per-source split
folders with their own indexes and no merged index (``write_published_mds``), and zstd train/ and
validation/ splits with merged indexes (``write_released_layout``); local, through a file:// remote
and through a real S3 protocol (moto's server on 127.0.0.1, streaming's S3 downloader); read with
Ettin's row rules; the index pass."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from data_fixtures import (TINY_SEQ_LEN, data_root, released_rows, tiny_tokenizer,  # noqa: F401
                           write_published_mds, write_released_layout)

from ettin.objectives.collate import CLMCollator, MLMCollator
from ettin.data.formats import fit_row
from ettin.data.loader import LoaderState, StepBatches, ValidationBatches
from ettin.data.mds import MDSSplit
from ettin.data.tokenizer import load_tokenizer, special_ids


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("released")
    rows = released_rows(tiny_tokenizer)
    write_released_layout(root / "ettin-data", rows)
    return root / "ettin-data", rows


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_tokenizer):
    """Two sources in the published layout: train/<source>/split_NN-tokenized-chunked-64/, each
    split folder with its own index.json, no merged index, no validation split."""
    rows = released_rows(tiny_tokenizer)["train"]
    sources = {"dclm": rows[:200], "books": rows[200:300]}
    root = tmp_path_factory.mktemp("published") / "ettin-pretraining-data"
    return write_published_mds(root, sources), sources


def held_out(rows: list, parts: int = 2) -> tuple[list, list]:
    """(train, validation) of one source written in ``parts`` split folders: the last
    ceil(0.1 %) of every folder's rows (one here) validates."""
    bounds = np.linspace(0, len(rows), parts + 1).astype(int)
    pieces = [rows[a:b] for a, b in zip(bounds, bounds[1:])]
    return [r for p in pieces for r in p[:-1]], [p[-1] for p in pieces]


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return special_ids(load_tokenizer(tiny_tokenizer))


def expected_row(row, ids, seq_len, close_rows):
    """Ettin's loader (recipe.md 5.5), written out: [CLS] first, cut to seq_len; an encoder row
    that then fills seq_len without [SEP] is cut to seq_len - 1 and closed with [SEP]."""
    row = list(row) if row and row[0] == ids.cls else [ids.cls, *row]
    row = row[:seq_len]
    if close_rows and row[-1] != ids.sep:
        row = row[:seq_len - 1] + [ids.sep]
    return tuple(row)


@pytest.mark.slow
def test_rows_are_the_stored_rows_with_cls_put_in_front(released, ids, tmp_path):
    root, rows = released
    split = MDSSplit(str(root), "train", cache_dir=str(tmp_path), cls=ids.cls)
    assert len(split) == len(rows["train"])
    for i in range(len(split)):
        stored = rows["train"][i]
        want = stored if stored[0] == ids.cls else [ids.cls, *stored]
        assert split.tokens(i).tolist() == want
        assert split.lengths[i] == len(want)
    assert any(r[0] != ids.cls for r in rows["train"])  # the rule was exercised
    assert len(MDSSplit(str(root), "validation", cache_dir=str(tmp_path))) == len(rows["validation"])


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_an_epoch_of_batches_holds_every_row_once(released, ids, tmp_path, objective):
    """One source of N rows: the first N positions are a permutation of its rows, so the rows the
    model gets equal the shards' rows (plus the row rules), each once."""
    root, rows = released
    seq_len = TINY_SEQ_LEN
    collator = CLMCollator(ids) if objective == "clm" else MLMCollator(ids, 512, 0.3, seed=0)
    seen = {}
    original = type(collator).__call__

    def record(self, samples):
        seen.update((p, tuple(self.row(t).tolist())) for p, t in samples)
        return original(self, samples)

    n = len(rows["train"])
    source = [{"path": str(root), "format": "mds", "cache_dir": str(tmp_path)}]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(collator), "__call__", record)
        steps = iter(StepBatches(source, seq_len=TINY_SEQ_LEN, collator=collator,
                                 global_batch_at=lambda t: 8, micro_batch_size=4, seed=3))
        for _ in range(-(-n // 8)):
            last = next(steps)
    first_epoch = Counter(row for p, row in seen.items() if p < n)
    close = objective == "mlm"
    assert first_epoch == Counter(expected_row(r, ids, TINY_SEQ_LEN, close) for r in rows["train"])
    assert max(len(r) for r in first_epoch) == TINY_SEQ_LEN  # long rows were cut
    assert last.state.samples == -(-n // 8) * 8
    if not close:  # the token clock counts the rows as the decoder sees them
        assert last.step_tokens == sum(len(r) for _, r in sorted(seen.items())[-8:])


def test_fit_row_matches_ettins_loader(ids):
    rng = np.random.default_rng(0)
    for _ in range(200):
        row = [ids.cls, *rng.integers(5, 500, int(rng.integers(1, 20))).tolist()]
        if rng.random() < 0.5:
            row[-1] = ids.sep
        for close in (False, True):
            got = fit_row(np.asarray(row), 10, close, ids.sep).tolist()
            if close and (not got or got[-1] != ids.sep):
                got = got + [ids.sep]
            assert tuple(got) == expected_row(row, ids, 10, close)


def rows_of(split) -> list:
    return [split.tokens(i).tolist() for i in range(len(split))]


def test_a_remote_reads_as_the_local_folder_through_a_bounded_cache(released, ids, tmp_path):
    """file:// goes through streaming's storage layer like hf:// or s3://: the index and the shards
    are fetched into the cache on demand (decompressed), and the cache limit holds."""
    root, _ = released
    local = MDSSplit(str(root), "train", cache_dir=str(tmp_path / "a"), cls=ids.cls)
    limit_gb = 3 * 4096 / (1 << 30)  # about three shards
    remote = MDSSplit(f"file://{root}", "train", cache_dir=str(tmp_path / "b"), cls=ids.cls,
                      cache_limit_gb=limit_gb)
    assert rows_of(remote) == rows_of(local)
    cached = [p for p in (tmp_path / "b").rglob("shard.*.mds") if p.is_file()]
    readers = [r for folder in remote.folders for r in folder.readers]
    largest = max(r.raw_data.bytes for r in readers)
    assert 0 < sum(p.stat().st_size for p in cached) <= limit_gb * (1 << 30) + largest
    assert not list((tmp_path / "b").rglob("*.zstd"))  # compressed copies are not kept
    assert len(cached) < len(readers)  # some were evicted


@pytest.mark.slow
def test_index_command_writes_next_to_the_data_or_into_the_cache(released, tmp_path, capsys,
                                                                 monkeypatch):
    import shutil

    from ettin.data.index import main

    root, rows = released
    plain = tmp_path / "plain"
    write_released_layout(plain, {"train": rows["train"][:50]}, compression=None)
    assert main([str(plain), "--splits", "train,validation", "--num-proc", "2"]) == 0
    out = capsys.readouterr().out  # no validation split: one sample of each part is held out
    assert "train (without its held-out validation samples): 48 samples" in out
    assert "validation (held out of train): 2 samples" in out
    assert (plain / "train" / "part_0" / "ettin-index-input_ids.json").is_file()
    import ettin.data.mds as mds

    readonly = tmp_path / "readonly"  # a folder this process cannot write to (root could)
    shutil.copytree(plain, readonly, ignore=shutil.ignore_patterns("ettin-index*"))
    monkeypatch.setattr(mds.os, "access", lambda path, mode: not str(path).startswith(str(readonly)))
    split = MDSSplit(str(readonly), "train", cache_dir=str(tmp_path / "cache"))
    assert rows_of(split) == rows["train"][:24] + rows["train"][25:49]
    assert list((tmp_path / "cache").rglob("ettin-index-input_ids.json"))
    assert not list(readonly.rglob("ettin-index*"))


def test_ids_beyond_the_tokenizer_are_refused_at_start(released, tmp_path):
    from ettin.data.corpus import builtin_documents
    from ettin.data.formats import check_sources
    from ettin.data.tokenizer import train_tokenizer

    root, _ = released
    small = train_tokenizer((t for _, t in builtin_documents(max_chars=20_000)), 300, tmp_path / "tok")
    with pytest.raises(ValueError, match=rf"holds token id 5\d\d but the training tokenizer has "
                                         rf"{len(small)} ids"):
        check_sources([{"path": str(root), "cache_dir": str(tmp_path)}], TINY_SEQ_LEN, small)


@pytest.mark.slow
def test_training_on_released_shards_sees_their_rows(released, ids, tiny_tokenizer, tmp_path,
                                                     monkeypatch):
    """python -m ettin.train on the released layout: the decoder's rows are the shards' rows with
    Ettin's rules; served as a file:// remote, the same folder trains identically (same rows in
    the same order, same losses)."""
    import csv

    from ettin.train_command import main

    root, rows = released
    seen: list = []
    original = StepBatches.rank_samples

    def record(self, state, batch):
        samples = original(self, state, batch)
        seen.extend(tuple(t.tolist()) for _, t in samples)
        return samples

    monkeypatch.setattr(StepBatches, "rank_samples", record)
    monkeypatch.setenv("ETTIN_CACHE_DIR", str(tmp_path / "cache"))
    runs = {}
    for where, path in (("local", str(root)), ("remote", f"file://{root}")):
        seen.clear()
        args = [f"output_dir={tmp_path / 'runs'}", f"data_dir={tmp_path / 'data'}",
                f"run_name={where}", "recipe=smoke", "pair=false", "objective=clm",
                "phase_order=[pretrain]", f"tokenizer={tiny_tokenizer}",
                f"phases.pretrain.seq_len={TINY_SEQ_LEN}", "phases.pretrain.tokens=4000",
                "phases.pretrain.warmup_tokens=1000", "phases.pretrain.decay_tokens=1000",
                "phases.pretrain.checkpoint_every_tokens=0", "phases.pretrain.val_every_tokens=2000",
                "trainer.num_workers=0", "export_at_end=false", "eval_at_end=false",
                f"data.pretrain=[{{path: '{path}', format: mds}}]"]
        assert main(args) == 0
        with (tmp_path / "runs" / where / "logs" / "pretrain" / "metrics.csv").open() as f:
            losses = [r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")]
        runs[where] = (list(seen), losses)
    allowed = Counter(expected_row(r, ids, TINY_SEQ_LEN, False) for r in rows["train"])
    assert runs["local"][0] and not Counter(runs["local"][0]) - allowed
    assert runs["remote"] == runs["local"] and runs["local"][1]
    assert list((tmp_path / "cache").rglob("shard.*.mds"))  # the remote's shards came through the cache


def test_dataloader_workers_share_a_small_cache(released, ids, tmp_path):
    """Two DataLoader workers read a remote through one cache that holds about two shards: they
    evict each other's shards and fetch them again, and get the batches of a single process."""
    from torch.utils.data import DataLoader

    root, _ = released

    def batches(workers):
        source = [{"path": f"file://{root}", "cache_dir": str(tmp_path), "cache_limit_gb": 1e-5}]
        steps = StepBatches(source, seq_len=TINY_SEQ_LEN, collator=CLMCollator(ids),
                            global_batch_at=lambda t: 8, micro_batch_size=4, seed=1)
        out = []
        for step, batch in zip(range(12), DataLoader(steps, batch_size=None, num_workers=workers)):
            out.append([mb["input_ids"].tolist() for mb in batch.micro_batches])
        return out

    assert batches(2) == batches(0)


def test_the_published_layout_reads_without_merged_indexes(published, tmp_path):
    """A root of per-source split folders, no merged index: every index.json at any depth is read,
    a source folder is read on its own, and the last row of every split folder validates."""
    import shutil

    from streaming.base.util import merge_index

    root, sources = published
    every = {name: held_out(rows) for name, rows in sources.items()}
    for name in sources:  # sources are the folders under train/, sorted
        split = MDSSplit(str(root / "train" / name), "train", cache_dir=str(tmp_path))
        assert rows_of(split) == every[name][0]
        assert rows_of(MDSSplit(str(root / "train" / name), "validation",
                                cache_dir=str(tmp_path))) == every[name][1]
    whole = MDSSplit(str(root), "train", cache_dir=str(tmp_path))
    assert rows_of(whole) == every["books"][0] + every["dclm"][0]
    pattern = MDSSplit(f"{root}/train/d*", "train", cache_dir=str(tmp_path))  # folders by pattern
    assert rows_of(pattern) == every["dclm"][0]
    merged = tmp_path / "merged"  # Ettin's one-level merge next to the split folders: same rows
    shutil.copytree(root, merged, ignore=shutil.ignore_patterns("ettin-index*"))  # as published
    for name in sources:
        merge_index(str(merged / "train" / name), keep_local=True)
    assert rows_of(MDSSplit(str(merged), "train", cache_dir=str(tmp_path))) == rows_of(whole)
    with pytest.raises(FileNotFoundError, match="no MDS index .* at any depth"):
        MDSSplit(str(tmp_path / "merged" / "nothing"), "train", cache_dir=str(tmp_path))


@pytest.mark.slow
def test_training_on_the_published_layout_mixes_its_sources(published, ids, tiny_tokenizer,
                                                            tmp_path, monkeypatch):
    """python -m ettin.train with the released layout's source folders weighted as a mixture: it
    trains on both sources' train rows only (the held-out rows are not in its splits) and validates
    on the held-out rows."""
    from ettin.train_command import main

    root, sources = published
    every = {name: held_out(rows) for name, rows in sources.items()}
    seen, validated, split_rows = set(), set(), []
    original_train, original_val = StepBatches.rank_samples, ValidationBatches.__iter__

    def record(self, state, batch):
        if not split_rows:
            split_rows.extend(rows_of(split) for split in self.splits)
        samples = original_train(self, state, batch)
        seen.update(tuple(t.tolist()) for _, t in samples)
        return samples

    def record_validation(self):
        for batch in original_val(self):
            validated.update(tuple(t.tolist()) for s, i in self.mine for t in [self.splits[s].tokens(i)])
            yield batch

    monkeypatch.setattr(StepBatches, "rank_samples", record)
    monkeypatch.setattr(ValidationBatches, "__iter__", record_validation)
    monkeypatch.setenv("ETTIN_CACHE_DIR", str(tmp_path / "cache"))
    args = [f"output_dir={tmp_path / 'runs'}", f"data_dir={tmp_path / 'data'}", "run_name=mix",
            "recipe=smoke", "pair=false", "objective=clm", "phase_order=[pretrain]",
            f"tokenizer={tiny_tokenizer}", f"phases.pretrain.seq_len={TINY_SEQ_LEN}",
            "phases.pretrain.tokens=3000", "phases.pretrain.warmup_tokens=500",
            "phases.pretrain.decay_tokens=500", "phases.pretrain.checkpoint_every_tokens=0",
            "phases.pretrain.val_every_tokens=1500", "trainer.num_workers=0",
            "export_at_end=false", "eval_at_end=false",
            f"data.pretrain=[{{path: '{root}/train/dclm', weight: 1}}, "
            f"{{path: '{root}/train/books', weight: 3}}]"]
    assert main(args) == 0
    train_rows = {expected_row(r, ids, TINY_SEQ_LEN, False) for n in every for r in every[n][0]}
    validation_rows = {expected_row(r, ids, TINY_SEQ_LEN, False) for n in every for r in every[n][1]}
    assert seen and seen <= train_rows and not seen & validation_rows
    assert split_rows == [[r if r[0] == ids.cls else [ids.cls, *r] for r in every[name][0]]
                          for name in ("dclm", "books")]  # the held-out rows are not trained on
    for name in every:
        assert seen & {expected_row(r, ids, TINY_SEQ_LEN, False) for r in every[name][0]}
    assert validated == validation_rows


@pytest.fixture
def s3_bucket(monkeypatch):
    """A local S3-compatible server (moto's server mode on 127.0.0.1) and a bucket in it; streaming's
    S3 downloader reaches it through S3_ENDPOINT_URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       "S3_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    client.create_bucket(Bucket="ettin")
    yield client
    server.stop()


@pytest.mark.slow
def test_an_s3_root_streams_through_streamings_downloader(published, ids, s3_bucket, tmp_path,
                                                          monkeypatch):
    """The published layout uploaded to S3: the root is listed, every index.json and shard comes
    through streaming's S3 downloader into the cache, and the batches equal the local folder's."""
    from streaming.base.storage.download import S3Downloader

    root, _ = published
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        s3_bucket.upload_file(str(path), "ettin", f"data/{path.relative_to(root.parent).as_posix()}")
    downloads = []
    original = S3Downloader._download_file_impl

    def counted(self, remote, local, timeout):
        downloads.append(remote)
        return original(self, remote, local, timeout)

    monkeypatch.setattr(S3Downloader, "_download_file_impl", counted)

    def batches(path, cache):
        steps = StepBatches([{"path": path, "cache_dir": str(cache)}], seq_len=TINY_SEQ_LEN,
                            collator=CLMCollator(ids), global_batch_at=lambda t: 8,
                            micro_batch_size=4, seed=2)
        return [[mb["input_ids"].tolist() for mb in step.micro_batches]
                for _, step in zip(range(30), steps)]

    remote = batches(f"s3://ettin/data/{root.name}", tmp_path / "s3")
    assert remote == batches(str(root), tmp_path / "local")
    shards = [p for p in root.rglob("shard.*.mds")]
    fetched = {d for d in downloads if d.endswith(".mds")}
    assert len(fetched) == len(shards) and sum(d.endswith("index.json") for d in downloads) == 4
    assert len(list((tmp_path / "s3").rglob("shard.*.mds"))) == len(shards)


@pytest.mark.slow
def test_two_runs_on_released_shards_replay_identical(released, tiny_tokenizer, tmp_path, monkeypatch):
    """ettin.compare's replay rebuilds an MDS phase as it trained (every recorded source field, the
    objective's collator: rows without [CLS] get one), so an honest pair on Ettin's shards shows
    "identical" in the replay, not one token short per such row."""
    from ettin.report import identity, runs
    from ettin.train_command import main

    root, _ = released
    monkeypatch.setenv("ETTIN_CACHE_DIR", str(tmp_path / "cache"))
    made = []
    for objective in ("mlm", "clm"):
        assert main([f"output_dir={tmp_path / 'runs'}", f"data_dir={tmp_path / 'data'}",
                     f"run_name={objective}", "recipe=smoke", "pair=false", f"objective={objective}",
                     "phase_order=[pretrain]", f"tokenizer={tiny_tokenizer}",
                     f"phases.pretrain.seq_len={TINY_SEQ_LEN}", "phases.pretrain.tokens=3000",
                     "phases.pretrain.warmup_tokens=500", "phases.pretrain.decay_tokens=500",
                     "phases.pretrain.checkpoint_every_tokens=0", "phases.pretrain.val_every_tokens=0",
                     "trainer.num_workers=0", "export_at_end=false", "eval_at_end=false",
                     f"data.pretrain=[{{path: '{root}', format: mds}}]"]) == 0
        made.append(runs.load_run(tmp_path / "runs" / objective))
    for run in made:  # the replay's token clock is the one the run recorded
        replayed = identity.replay(run, "pretrain")
        record = identity._counters(run, "pretrain")
        steps = replayed.steps[:record["steps"]]
        assert sum(tokens for _, tokens, _ in steps) == record["tokens"]
    checks = identity.order_checks(made[0], made[1], "pretrain")
    assert all(c.status == identity.IDENTICAL for c in checks), [(c.name, c.status, c.how) for c in checks]
