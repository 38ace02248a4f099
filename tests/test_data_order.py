"""Replaying a released data order: parquet files in the layout of jhu-clsp/ettin-data-order
(``checkpoint_<k>/steps_<a>_to_<b>.parquet``, zstd, ``input_ids`` list<uint16> padded with [PAD],
``step``), trained on batch for batch."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import data_root, tiny_tokenizer  # noqa: F401

from ettin.objectives.collate import CLMCollator
from ettin.data.loader import LoaderState, StepBatches
from ettin.data.tokenizer import load_tokenizer, special_ids

BATCHES = [4, 4, 8, 8, 8, 8, 8]  # rows per step: a batch-size warmup, as Ettin's first steps
WIDTH = 24


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return special_ids(load_tokenizer(tiny_tokenizer))


@pytest.fixture(scope="module")
def released_order(tmp_path_factory, ids):
    """Two checkpoint folders of steps 1-3 and 4-7 (Composer counts from 1); returns the folder
    and the unpadded rows of each step."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("order") / "ettin-data-order"
    steps = {}
    for step, batch in enumerate(BATCHES, start=1):
        rows = []
        for _ in range(batch):
            n = int(rng.integers(3, WIDTH))
            rows.append([ids.cls, *rng.integers(5, 500, n - 2).tolist(), ids.sep])
        steps[step] = rows
    for folder, (first, last) in (("checkpoint_000001", (1, 3)), ("checkpoint_000002", (4, 7))):
        (root / folder).mkdir(parents=True)
        rows = [r + [ids.pad] * (WIDTH - len(r)) for s in range(first, last + 1) for r in steps[s]]
        numbers = [s for s in range(first, last + 1) for _ in steps[s]]
        table = pa.Table.from_arrays(
            [pa.array(rows, type=pa.list_(pa.uint16())), pa.array(numbers, type=pa.uint64())],
            names=["input_ids", "step"], metadata={b"sequence_length": str(WIDTH).encode()})
        pq.write_table(table, root / folder / f"steps_{first:06d}_to_{last:06d}.parquet",
                       compression="ZSTD")
    return root, steps


def batches(root, ids, tmp_path, *, state=None, rank=0, world_size=1, from_step=None, count=3):
    source = [{"path": str(root), "format": "order", "from_step": from_step,
               "cache_dir": str(tmp_path)}]
    steps = StepBatches(source, seq_len=WIDTH, collator=CLMCollator(ids),
                        global_batch_at=lambda tokens: 1 << 30, micro_batch_size=3, seed=0,
                        state=state, rank=rank, world_size=world_size)
    out, iterator = [], iter(steps)
    for _ in range(count):
        step = next(iterator)
        rows = []
        for micro in step.micro_batches:
            cut = micro["cu_seqlens"].tolist()
            flat = micro["input_ids"].tolist()
            rows += [flat[a:b] for a, b in zip(cut, cut[1:])]
        out.append((rows, step))
    return out


def test_each_step_is_the_released_batch(released_order, ids, tmp_path):
    root, steps = released_order
    got = batches(root, ids, tmp_path, count=len(BATCHES))
    for s, (rows, step) in enumerate(got):
        assert rows == steps[s + 1]
        assert step.global_batch == BATCHES[s]
        assert step.step_tokens == sum(len(r) for r in steps[s + 1])
    assert got[-1][1].state == LoaderState(len(BATCHES), sum(BATCHES),
                                              sum(len(r) for v in steps.values() for r in v))


def test_resume_and_ranks_and_continuing_a_released_step(released_order, ids, tmp_path):
    root, steps = released_order
    after_two = batches(root, ids, tmp_path, count=2)[-1][1].state
    resumed = batches(root, ids, tmp_path, state=after_two, count=1)[0]
    assert resumed[0] == steps[3] and resumed[1].state.step == 3
    halves = [batches(root, ids, tmp_path, rank=r, world_size=2, count=3)[2][0] for r in (0, 1)]
    assert halves[0] + halves[1] == steps[3]
    continued = batches(root, ids, tmp_path, from_step=4, count=1)[0]
    assert continued[0] == steps[4]


def test_an_order_that_ends_too_early_says_so(released_order, ids, tmp_path):
    root, _ = released_order
    with pytest.raises(ValueError, match="ends after step 7"):
        batches(root, ids, tmp_path, count=len(BATCHES) + 1)
    with pytest.raises(ValueError, match="has no step 99"):
        batches(root, ids, tmp_path, from_step=99)


def test_training_replays_the_order(released_order, ids, tiny_tokenizer, tmp_path, monkeypatch):
    """python -m ettin.train with data.pretrain=[{path: ..., format: order}]: every step trains on
    the released batch of that step."""
    from ettin.train.cli import main

    root, steps = released_order
    seen = []
    original = StepBatches.rank_samples

    def record(self, state, batch):
        samples = original(self, state, batch)
        seen.append([t.tolist() for _, t in samples])
        return samples

    monkeypatch.setattr(StepBatches, "rank_samples", record)
    tokens = sum(len(r) for s in range(1, 6) for r in steps[s])
    args = [f"output_dir={tmp_path / 'runs'}", f"data_dir={tmp_path / 'data'}", "run_name=replay",
            "recipe=smoke", "pair=false", "objective=clm", "phase_order=[pretrain]",
            f"tokenizer={tiny_tokenizer}", f"phases.pretrain.seq_len={WIDTH}",
            f"phases.pretrain.tokens={tokens}", "phases.pretrain.warmup_tokens=10",
            "phases.pretrain.decay_tokens=10", "phases.pretrain.checkpoint_every_tokens=0",
            "phases.pretrain.val_every_tokens=0", "trainer.num_workers=0", "export_at_end=false",
            "eval_at_end=false", f"data.pretrain=[{{path: '{root}', format: order, "
                                 f"cache_dir: '{tmp_path / 'cache'}'}}]"]
    assert main(args) == 0
    assert seen[:5] == [steps[s] for s in range(1, 6)]
