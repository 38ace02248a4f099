"""Replaying a released data order in the layout jhu-clsp/ettin-data-order publishes, written with
pyarrow: ``checkpoint_<k>/steps_<a>_to_<b>.parquet`` (zstd, ``input_ids`` list<uint16> padded with
[PAD], ``step``), step numbers starting again at 1 in every folder. Rows are consumed in the released
order, grouped by this run's batch schedule (or by the released steps), and every folder's tokens
are consumed exactly."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import data_root, tiny_tokenizer  # noqa: F401

from ettin.objectives.collate import CLMCollator
from ettin.data.formats import check_sources
from ettin.data.loader import LoaderState, StepBatches
from ettin.data.tokenizer import load_tokenizer, special_ids

# Rows per released step, per folder (a batch-size warmup in the first folder). Steps restart at 1.
FOLDERS = {"checkpoint_000001": [4, 4, 6, 6], "checkpoint_000002": [8, 8, 8]}
FILES = {"checkpoint_000001": [(1, 2), (3, 4)], "checkpoint_000002": [(1, 3)]}
WIDTH = 24
BATCH = 6  # this run's global batch: not the released grouping


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return special_ids(load_tokenizer(tiny_tokenizer))


def write_order(root, ids, sizes_per_folder: dict, files: dict, seed: int = 0) -> dict:
    """A data order in the published layout under ``root``: per folder, its steps' rows (unpadded),
    as written; ``files``: folder -> (first, last) step of each file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    folders = {}
    for folder, sizes in sizes_per_folder.items():
        steps = {}
        for step, batch in enumerate(sizes, start=1):
            steps[step] = [[ids.cls, *rng.integers(5, 500, int(rng.integers(1, WIDTH - 2))).tolist(),
                            ids.sep] for _ in range(batch)]
        folders[folder] = steps
        (root / folder).mkdir(parents=True)
        for first, last in files[folder]:
            write_file(root / folder / f"steps_{first:06d}_to_{last:06d}.parquet", ids,
                       {s: steps[s] for s in range(first, last + 1)})
    return folders


def write_file(path, ids, steps: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r + [ids.pad] * (WIDTH - len(r)) for s in sorted(steps) for r in steps[s]]
    numbers = [s for s in sorted(steps) for _ in steps[s]]
    table = pa.Table.from_arrays(
        [pa.array(rows, type=pa.list_(pa.uint16())), pa.array(numbers, type=pa.uint64())],
        names=["input_ids", "step"], metadata={b"sequence_length": str(WIDTH).encode()})
    pq.write_table(table, path, compression="ZSTD")


@pytest.fixture(scope="module")
def released_order(tmp_path_factory, ids):
    """The order's root and, per folder, its released steps' rows (unpadded), as written."""
    root = tmp_path_factory.mktemp("order") / "ettin-data-order"
    return root, write_order(root, ids, FOLDERS, FILES)


def all_rows(folders) -> list:
    return [r for steps in folders.values() for s in sorted(steps) for r in steps[s]]


def folder_tokens(folders) -> list[int]:
    return [sum(len(r) for rows in steps.values() for r in rows) for steps in folders.values()]


def steps_of(root, ids, tmp_path, *, state=None, rank=0, world_size=1, from_step=None,
             grouping="schedule", batch=BATCH, from_folder=None):
    source = [{"path": f"{root}/checkpoint_*", "format": "order", "from_step": from_step,
               "from_folder": from_folder, "order_batches": grouping, "cache_dir": str(tmp_path)}]
    return StepBatches(source, seq_len=WIDTH, collator=CLMCollator(ids),
                       global_batch_at=lambda tokens: batch, micro_batch_size=3, seed=0,
                       state=state, rank=rank, world_size=world_size)


def rows_per_step(steps) -> list[tuple[list, dict]]:
    out = []
    for step in steps:  # to the end of the order
        rows = []
        for micro in step.micro_batches:
            cut = micro["cu_seqlens"].tolist()
            flat = micro["input_ids"].tolist()
            rows += [flat[a:b] for a, b in zip(cut, cut[1:])]
        out.append((rows, step))
    return out


def test_rows_are_consumed_in_order_in_this_runs_batches(released_order, ids, tmp_path):
    root, folders = released_order
    got = rows_per_step(steps_of(root, ids, tmp_path))
    consumed = [r for rows, _ in got for r in rows]
    assert consumed == all_rows(folders)  # every row once, in the released order, pads dropped
    total = len(consumed)
    assert [s.global_batch for _, s in got] == [BATCH] * (total // BATCH) + [total % BATCH]
    ends = np.cumsum([len(all_rows({f: s})) for f, s in folders.items()])
    clock = np.cumsum([0] + [len(r) for r in consumed])
    assert [int(clock[e]) for e in ends] == np.cumsum(folder_tokens(folders)).tolist()
    assert got[-1][1].state == LoaderState(len(got), total, int(clock[-1]))


def test_released_grouping_on_request(released_order, ids, tmp_path):
    root, folders = released_order
    got = rows_per_step(steps_of(root, ids, tmp_path, grouping="released"))
    released = [steps[s] for steps in folders.values() for s in sorted(steps)]
    assert [rows for rows, _ in got] == released


def test_resume_in_a_folder_from_step_and_ranks(released_order, ids, tmp_path):
    root, folders = released_order
    rows = all_rows(folders)
    whole = rows_per_step(steps_of(root, ids, tmp_path))
    middle = whole[1][1].state  # 12 rows in: inside checkpoint_000001 (20 rows)
    assert 0 < middle.samples < sum(FOLDERS["checkpoint_000001"])
    resumed = rows_per_step(steps_of(root, ids, tmp_path, state=middle))
    assert [r for step, _ in resumed for r in step] == rows[middle.samples:]
    # from_step counts released steps across the folders: step 5 is checkpoint_000002's step 1.
    continued = rows_per_step(steps_of(root, ids, tmp_path, from_step=5))
    assert continued[0][0] == folders["checkpoint_000002"][1][:BATCH]
    halves = [rows_per_step(steps_of(root, ids, tmp_path, rank=r, world_size=2))[2][0] for r in (0, 1)]
    assert halves[0] + halves[1] == rows[2 * BATCH:3 * BATCH]


def test_a_resume_from_another_order_is_caught_at_the_folder_end(released_order, ids, tmp_path):
    root, _ = released_order
    wrong = LoaderState(step=2, samples=12, tokens=1)  # a clock that is not this order's
    with pytest.raises(ValueError, match="end of the released folder checkpoint_000001"):
        rows_per_step(steps_of(root, ids, tmp_path, state=wrong))


def test_a_phase_longer_than_the_order_is_refused_with_the_numbers(released_order, ids,
                                                                   tiny_tokenizer, tmp_path):
    root, folders = released_order
    tokenizer = load_tokenizer(tiny_tokenizer)
    total = sum(folder_tokens(folders))
    source = [{"path": f"{root}/checkpoint_*", "format": "order", "cache_dir": str(tmp_path)}]
    check_sources(source, WIDTH, tokenizer, phase_tokens=total)  # exactly what was released
    with pytest.raises(ValueError, match=rf"needs {total + 1:,} tokens but the data order .* holds "
                                         rf"{total:,} \(44 rows in 2 folders\)"):
        check_sources(source, WIDTH, tokenizer, phase_tokens=total + 1)
    last = folders["checkpoint_000002"][3][-2:]  # 44 rows on 3 ranks: the last two are left out
    usable = total - sum(map(len, last))
    check_sources(source, WIDTH, tokenizer, phase_tokens=usable, world_size=3)
    with pytest.raises(ValueError, match="its last 2 rows cannot be shared by 3 ranks"):
        check_sources(source, WIDTH, tokenizer, phase_tokens=usable + 1, world_size=3)
    with pytest.raises(ValueError, match="has no step 8: its folders hold steps 1 to 7"):
        check_sources([{**source[0], "from_step": 8}], WIDTH, tokenizer)


def test_a_folder_listing_a_step_twice_is_refused(released_order, ids, tmp_path):
    import shutil

    root, _ = released_order
    copy = tmp_path / "order"
    shutil.copytree(root, copy)
    folder = copy / "checkpoint_000001"  # a file copied in under another name: steps 1-2 again
    shutil.copy(folder / "steps_000001_to_000002.parquet", folder / "steps_000005_to_000006.parquet")
    with pytest.raises(ValueError, match="checkpoint_000001 lists some step twice or out of order"):
        steps_of(copy, ids, tmp_path)


@pytest.mark.slow
def test_training_consumes_the_whole_order_and_ends_the_phase(released_order, ids, tiny_tokenizer,
                                                              tmp_path, monkeypatch):
    """python -m ettin.train on the released folders, the phase's tokens = the order's tokens: every
    row is trained on once, in order; the phase ends cleanly with its phase-end checkpoint."""
    from ettin.store.checkpoints import list_checkpoints, read_meta
    from ettin.train_command import main

    root, folders = released_order
    seen = []
    original = StepBatches.rank_samples

    def record(self, state, batch):
        samples = original(self, state, batch)
        seen.extend(t.tolist() for _, t in samples)
        return samples

    monkeypatch.setattr(StepBatches, "rank_samples", record)
    total = sum(folder_tokens(folders))
    args = [f"output_dir={tmp_path / 'runs'}", f"data_dir={tmp_path / 'data'}", "run_name=replay",
            "recipe=smoke", "pair=false", "objective=clm", "phase_order=[pretrain]",
            f"tokenizer={tiny_tokenizer}", f"phases.pretrain.seq_len={WIDTH}",
            f"phases.pretrain.tokens={total}", "phases.pretrain.warmup_tokens=10",
            "phases.pretrain.decay_tokens=10", "phases.pretrain.checkpoint_every_tokens=0",
            "phases.pretrain.val_every_tokens=0", f"global_batch={BATCH}",
            "phases.pretrain.batch_warmup_tokens=0", "trainer.num_workers=0",
            "export_at_end=false", "eval_at_end=false",
            f"data.pretrain=[{{path: '{root}/checkpoint_*', format: order, "
            f"cache_dir: '{tmp_path / 'cache'}'}}]"]
    assert main(args) == 0
    assert seen == all_rows(folders)
    ends = [read_meta(c) for c in list_checkpoints(tmp_path / "runs" / "replay")]
    assert [m["tokens"] for m in ends if m["phase_end"]] == [total]
    seen.clear()
    too_long = [a.replace(f"tokens={total}", f"tokens={total + 1}") for a in args]
    assert main([*too_long[:2], "run_name=too-long", *too_long[3:]]) == 2
    assert not seen


def test_folders_are_replayed_checkpoint_then_ext_then_decay(ids, tmp_path):
    from ettin.data.released_order import ReleasedOrder

    # Names sort decay < ext < checkpoint_000010 < ...: the training order is none of those.
    sizes = {"decay_000001": [2], "ext_000001": [3], "checkpoint_000002": [2], "checkpoint_000001": [1]}
    folders = write_order(tmp_path / "order", ids, sizes, {f: [(1, 1)] for f in sizes})
    order = ReleasedOrder(str(tmp_path / "order"), pad=ids.pad, cache_dir=str(tmp_path / "cache"))
    expected = [r for name in ("checkpoint_000001", "checkpoint_000002", "ext_000001", "decay_000001")
                for r in folders[name][1]]
    assert [r.tolist() for r in order.read(0, order.rows)] == expected
    assert [name for name, _ in order.folder_ends()] == ["checkpoint_000001", "checkpoint_000002",
                                                         "ext_000001", "decay_000001"]


def copy_of_order(released_order, tmp_path):
    import shutil

    root, _ = released_order
    shutil.copytree(root, tmp_path / "order")
    return tmp_path / "order"


def test_a_missing_file_is_refused_at_start(released_order, ids, tmp_path):
    copy = copy_of_order(released_order, tmp_path)
    (copy / "checkpoint_000001" / "steps_000001_to_000002.parquet").unlink()
    with pytest.raises(ValueError, match="checkpoint_000001 has no file for steps 1 to 2"):
        steps_of(copy, ids, tmp_path)


def test_a_file_missing_a_step_is_refused_at_start(released_order, ids, tmp_path):
    copy = copy_of_order(released_order, tmp_path)
    _, folders = released_order
    file = copy / "checkpoint_000001" / "steps_000003_to_000004.parquet"
    write_file(file, ids, {3: folders["checkpoint_000001"][3]})  # step 4's rows gone
    with pytest.raises(ValueError, match="steps_000003_to_000004.parquet should hold steps 3 to 4 "
                                         "but lacks step 4"):
        steps_of(copy, ids, tmp_path)


def test_a_missing_folder_is_refused_at_start(released_order, ids, tmp_path):
    copy = copy_of_order(released_order, tmp_path)
    (copy / "checkpoint_000002").rename(copy / "checkpoint_000003")
    with pytest.raises(ValueError, match="has no folder checkpoint_000002 before checkpoint_000003"):
        steps_of(copy, ids, tmp_path)


def test_from_folder_starts_at_that_folders_first_row(released_order, ids, tmp_path):
    root, folders = released_order
    continued = rows_per_step(steps_of(root, ids, tmp_path, from_folder="checkpoint_000002"))
    assert [r for rows, _ in continued for r in rows] == all_rows({"c": folders["checkpoint_000002"]})
    with pytest.raises(ValueError, match="has no folder 'checkpoint_000009'.*checkpoint_000001 to "
                                         "checkpoint_000002"):
        steps_of(root, ids, tmp_path, from_folder="checkpoint_000009")


# ---------------------------------------------------------------------------------------------------
# Continuing a released model revision: paired by folder, never by step number

REVISIONS = ["main", "step1200", "step600", "ext300", "decay100"]  # as the hub lists them: unsorted


def test_the_folder_after_a_revision_is_paired_by_position_never_by_step():
    from ettin.data.released_order import folder_after

    folders = ["checkpoint_000001", "checkpoint_000002", "ext_000001"]
    assert folder_after("step600", REVISIONS, folders) == "checkpoint_000002"
    assert folder_after("step1200", REVISIONS, folders) == "ext_000001"  # the phase's last
    assert folder_after("ext300", REVISIONS, folders) == "decay_000001"
    with pytest.raises(ValueError, match="after step600 cannot be established: the model has 2 "
                                         "step\\* revisions but the data order given has 1 "
                                         "checkpoint_\\* folders"):
        folder_after("step600", REVISIONS, folders[1:])
    with pytest.raises(ValueError, match="decay100 is the model's last revision"):
        folder_after("decay100", REVISIONS, ["decay_000001"])
    with pytest.raises(ValueError, match="init_revision=main is not a released training revision"):
        folder_after("main", REVISIONS, folders)
    with pytest.raises(ValueError, match="the model has no revision step900"):
        folder_after("step900", REVISIONS, folders)


def test_a_continuation_that_cannot_be_paired_is_refused_with_the_reason(released_order, ids,
                                                                         tiny_tokenizer, tmp_path):
    from ettin.data.formats import check_released_continuation
    from ettin.data.released_order import check_continuation
    from ettin.data.source import DataSource

    root, _ = released_order
    folders = ["checkpoint_000001", "checkpoint_000002"]
    listed = lambda repo: REVISIONS

    def offline(repo):
        raise OSError("offline")

    source = DataSource(path=f"{root}/checkpoint_*", format="order", from_folder="checkpoint_000002")
    check_continuation("jhu-clsp/x", "step600", source, folders, listed)
    # What README once said: from_step <k+1> with the model's step k.
    with pytest.raises(ValueError, match="from_step: 601 counts the data order's released steps.*"
                                         "from_folder: checkpoint_000002"):
        check_continuation("jhu-clsp/x", "step600", DataSource(path="x", format="order", from_step=601),
                           folders, listed)
    with pytest.raises(ValueError, match="the folder checkpoint_000002, but the order starts at its "
                                         "first folder"):
        check_continuation("jhu-clsp/x", "step600", DataSource(path="x", format="order"), folders, listed)
    with pytest.raises(ValueError, match="cannot be established: listing its revisions failed"):
        check_continuation("jhu-clsp/x", "step600", source, folders, offline)
    # At start the hub is asked (offline in the tests): refused, not guessed.
    with pytest.raises(ValueError, match="cannot be established"):
        check_released_continuation("jhu-clsp/ettin-encoder-17m", "step600",
                                    [{**vars(source), "cache_dir": str(tmp_path)}],
                                    load_tokenizer(tiny_tokenizer))
