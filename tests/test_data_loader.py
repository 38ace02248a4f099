"""The loader: a global order that is a function of (seed, phase, position); O(1) resume that
repeats exactly what an uninterrupted run would have seen, for 1 or 2 ranks and 0 or 2 workers;
mixture proportions; fixed validation batches."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from data_fixtures import (TINY_SEQ_LEN, data_root, tiny_prepared, tiny_prepared_long,  # noqa: F401
                           tiny_tokenizer)
from torch.utils.data import DataLoader

from ettin.objectives.collate import CLMCollator, MLMCollator
from ettin.data.formats import PreparedSplit
from ettin.data.loader import LoaderState, StepBatches, ValidationBatches, pack_rows, validation_batches
from ettin.data.order import Mixture, permute
from ettin.data.tokenizer import load_tokenizer, special_ids


@dataclass(frozen=True)
class Ramp:
    """A picklable batch-size warmup: 4, 8, then 16 sequences as tokens grow."""

    def __call__(self, tokens: int) -> int:
        return 4 if tokens < 600 else 8 if tokens < 1_800 else 16


def mlm(tiny_tokenizer, unpadded=True):
    tokenizer = load_tokenizer(tiny_tokenizer)
    return MLMCollator(special_ids(tokenizer), vocab_size=len(tokenizer), mask_rate=0.3, seed=3,
                       unpadded=unpadded)


def loader(source, tiny_tokenizer, state=None, rank=0, world_size=1, workers=0, **kwargs):
    steps = StepBatches(source, seq_len=TINY_SEQ_LEN, collator=mlm(tiny_tokenizer),
                        global_batch_at=Ramp(), micro_batch_size=2, rank=rank,
                        world_size=world_size, seed=11, phase="pretrain", state=state, **kwargs)
    return DataLoader(steps, batch_size=None, num_workers=workers)


def take(data_loader, n):
    out = []
    for item in data_loader:
        out.append(item)
        if len(out) == n:
            return out


def flat(item) -> tuple[list, list]:
    """A step's tokens and labels (all micro-batches, unpadded, in order)."""
    ids = torch.cat([m["input_ids"] for m in item.micro_batches]).tolist()
    labels = torch.cat([m["labels"] for m in item.micro_batches]).tolist()
    return ids, labels


def test_permutations_are_bijections_keyed_by_seed():
    for n in (1, 2, 3, 7, 64, 1000, 12_345):
        p = permute(np.arange(n), n, key=42)
        assert sorted(p.tolist()) == list(range(n))
    a, b = permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2)
    assert not np.array_equal(a, b)
    assert abs(np.corrcoef(np.arange(1000), a)[0, 1]) < 0.1  # shuffled, not a near-identity
    big = permute(np.array([0, 10**12 - 1]), 10**12, 3)  # any position, in O(1) memory
    assert (big < 10**12).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_repeats_exactly_the_uninterrupted_batches(tiny_prepared, tiny_tokenizer, workers):
    straight = take(loader(tiny_prepared, tiny_tokenizer, workers=workers), 12)
    saved = straight[6].state  # the counters a checkpoint after step 7 stores
    assert saved == LoaderState(step=7, samples=sum(s.global_batch for s in straight[:7]),
                                tokens=sum(s.step_tokens for s in straight[:7]))
    resumed = take(loader(tiny_prepared, tiny_tokenizer, state=saved, workers=workers), 5)
    for a, b in zip(straight[7:], resumed):
        assert a.state == b.state and a.global_batch == b.global_batch
        assert flat(a) == flat(b)
    assert [s.global_batch for s in straight][:3] == [4, 4, 4]  # the ramp follows the tokens
    assert straight[-1].global_batch == 16


def test_workers_do_not_change_the_order(tiny_prepared, tiny_tokenizer):
    zero = take(loader(tiny_prepared, tiny_tokenizer, workers=0), 9)
    two = take(loader(tiny_prepared, tiny_tokenizer, workers=2), 9)
    assert [flat(a) for a in zero] == [flat(b) for b in two]
    assert [a.state for a in zero] == [b.state for b in two]


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_split_the_same_global_batches_and_resume(tiny_prepared, tiny_tokenizer, workers):
    single = take(loader(tiny_prepared, tiny_tokenizer), 10)
    ranks = [take(loader(tiny_prepared, tiny_tokenizer, rank=r, world_size=2, workers=workers), 10)
             for r in range(2)]
    for step, one in enumerate(single):
        r0, r1 = ranks[0][step], ranks[1][step]
        assert r0.state == r1.state == one.state
        ids0, lab0 = flat(r0)
        ids1, lab1 = flat(r1)
        assert (ids0 + ids1, lab0 + lab1) == flat(one)  # disjoint halves of the same global batch
        assert len(r0.micro_batches) == one.global_batch // 2 // 2
    saved = ranks[0][4].state
    for r in range(2):
        resumed = take(loader(tiny_prepared, tiny_tokenizer, state=saved, rank=r, world_size=2,
                              workers=workers), 5)
        assert [flat(x) for x in resumed] == [flat(x) for x in ranks[r][5:10]]
    # A run saved with 2 ranks continues the same global order on 1 rank.
    resumed = take(loader(tiny_prepared, tiny_tokenizer, state=saved), 5)
    assert [flat(x) for x in resumed] == [flat(x) for x in single[5:10]]


def test_each_epoch_is_a_permutation_and_epochs_differ(tiny_prepared):
    split = PreparedSplit(tiny_prepared, "train")
    n = len(split)
    mixture = Mixture([split], [1.0], seed=1, phase="p", seq_len=TINY_SEQ_LEN)
    _, first = mixture.locate(np.arange(n))
    _, second = mixture.locate(np.arange(n, 2 * n))
    assert sorted(first.tolist()) == list(range(n)) == sorted(second.tolist())
    assert not np.array_equal(first, second)
    _, other_phase = Mixture([split], [1.0], seed=1, phase="q", seq_len=TINY_SEQ_LEN).locate(np.arange(n))
    assert not np.array_equal(first, other_phase)


def test_token_counter_counts_the_consumed_samples(tiny_prepared, tiny_tokenizer):
    steps = take(loader(tiny_prepared, tiny_tokenizer), 5)
    lengths = np.load(tiny_prepared / "train" / "lengths.npy")
    mixture = Mixture([PreparedSplit(tiny_prepared, "train")], [1.0], seed=11, phase="pretrain",
                      seq_len=TINY_SEQ_LEN)
    _, index = mixture.locate(np.arange(steps[-1].state.samples))
    assert steps[-1].state.tokens == int(lengths[index].sum())
    for step in steps:  # step_tokens are the stored tokens (an encoder's closing [SEP] not counted)
        rows = sum(len(torch.diff(m["cu_seqlens"])) for m in step.micro_batches)
        assert rows == step.global_batch


@pytest.mark.slow
def test_mixture_proportions_follow_the_token_weights(tiny_prepared, tiny_prepared_long):
    splits = [PreparedSplit(tiny_prepared, "train"), PreparedSplit(tiny_prepared_long, "train")]
    for weights in ([0.7, 0.3], [0.1, 0.9], [1, 1]):
        mixture = Mixture(splits, weights, seed=5, phase="p", seq_len=128)
        count = 300_000
        source, index = mixture.locate(np.arange(count))
        lengths = mixture.lengths(0, count)
        share = lengths[source == 0].sum() / lengths.sum()
        assert abs(share - weights[0] / sum(weights)) < 0.01, (weights, share)
        # Any window of a few thousand samples is already close to the proportions (no long runs).
        window = source[:4000]
        expected = mixture.block_counts[0] / mixture.block_counts.sum()
        assert abs((window == 0).mean() - expected) < 0.03
    # Over a whole mixture block every sample of a source is used equally often (+-1): a small
    # source repeats whole epochs, like Ettin's up-sampled copies, in shuffled order.
    from ettin.data.order import MIX_BLOCK

    mixture = Mixture(splits, [0.7, 0.3], seed=5, phase="p", seq_len=128)
    source, index = mixture.locate(np.arange(MIX_BLOCK))
    for i, split in enumerate(splits):
        uses = np.bincount(index[source == i], minlength=len(split))
        assert uses.max() - uses.min() <= 1 and uses.min() >= 1


def test_mixture_steps_resume_and_read_both_sources(tiny_prepared, tiny_prepared_long, tiny_tokenizer):
    sources = [(str(tiny_prepared), 0.5), (str(tiny_prepared_long), 0.5)]

    def run(state=None):
        return StepBatches(sources, seq_len=128, collator=CLMCollator(special_ids(load_tokenizer(tiny_tokenizer))),
                           global_batch_at=Ramp(), micro_batch_size=4, seed=2, phase=1, state=state)

    straight = take(run(), 8)
    resumed = take(run(straight[3].state), 4)
    assert [flat(x) for x in resumed] == [flat(x) for x in straight[4:8]]
    assert max(max(torch.diff(m["cu_seqlens"]).tolist()) for s in straight for m in s.micro_batches) > 64


def test_global_batch_must_divide_by_the_world_size(tiny_prepared, tiny_tokenizer):
    with pytest.raises(ValueError, match="not a positive multiple of the world size 3"):
        StepBatches(tiny_prepared, seq_len=TINY_SEQ_LEN, collator=mlm(tiny_tokenizer),
                    global_batch_at=Ramp(), micro_batch_size=2, rank=0, world_size=3)


def test_packed_micro_batches_fill_a_token_budget(tiny_prepared, tiny_tokenizer):
    steps = StepBatches(tiny_prepared, seq_len=TINY_SEQ_LEN, collator=mlm(tiny_tokenizer),
                        global_batch_at=lambda t: 16, micro_batch_size=2, seed=11, phase="pretrain",
                        pack=True)
    plain = StepBatches(tiny_prepared, seq_len=TINY_SEQ_LEN, collator=mlm(tiny_tokenizer),
                        global_batch_at=lambda t: 16, micro_batch_size=2, seed=11, phase="pretrain")
    for packed, unpacked in zip(take(steps, 4), take(plain, 4)):
        assert flat(packed) == flat(unpacked)  # the same samples, in the same order
        budget = 2 * TINY_SEQ_LEN
        sizes = [int(m["cu_seqlens"][-1]) - len(m["cu_seqlens"]) + 1 for m in packed.micro_batches]
        assert all(s <= budget for s in sizes)  # stored tokens per micro-batch (before [SEP]s)
        assert len(packed.micro_batches) <= len(unpacked.micro_batches)
    with pytest.raises(ValueError, match="unpadded"):
        StepBatches(tiny_prepared, seq_len=TINY_SEQ_LEN, collator=mlm(tiny_tokenizer, unpadded=False),
                    global_batch_at=lambda t: 4, micro_batch_size=2, pack=True)


def test_pack_rows_fills_the_budget_in_order_then_splits_the_largest():
    lengths = [5, 4, 3, 9, 1, 1, 1, 12, 2]
    assert pack_rows(lengths, 10) == [2, 1, 2, 2, 1, 1]  # 5+4 | 3 | 9+1 (exactly 10) | 1+1 | 12 alone | 2
    assert pack_rows(lengths, 10, groups=8) == [1, 1, 1, 1, 1, 2, 1, 1]  # the largest halved, first first
    assert pack_rows(lengths, 10, groups=20) == [1] * 9  # never an empty micro-batch
    assert pack_rows([3], 10, groups=3) == [1]
    assert pack_rows([], 10, groups=2) == []
    for groups in range(1, 10):
        sizes = pack_rows(lengths, 10, groups=groups)
        assert sum(sizes) == len(lengths) and min(sizes) >= 1 and len(sizes) == max(groups, 6)
        bounds = np.cumsum([0, *sizes])
        assert all(sum(lengths[a:b]) <= 10 or b - a == 1 for a, b in zip(bounds[:-1], bounds[1:]))


def test_packed_ranks_get_the_same_number_of_micro_batches(tiny_prepared_long, tiny_tokenizer):
    """A sharded model's forwards are collective: a rank with fewer micro-batches would hang the
    others. The ranks' samples stay those of the unpacked loader."""
    world, batch, steps, budget = 3, 30, 20, 4 * 256

    def loader(pack, rank):  # rows of at most 128 tokens; packed micro-batches of 4 x 256 tokens
        return StepBatches(tiny_prepared_long, seq_len=256, collator=mlm(tiny_tokenizer),
                           global_batch_at=lambda t: batch, micro_batch_size=4, rank=rank,
                           world_size=world, seed=11, phase="pretrain", pack=pack)

    packed = [take(loader(True, r), steps) for r in range(world)]
    plain = [take(loader(False, r), steps) for r in range(world)]
    mixture, share = loader(True, 0).mixture, batch // world
    balanced = 0
    for step in range(steps):
        counts = [len(packed[r][step].micro_batches) for r in range(world)]
        assert len(set(counts)) == 1, (step, counts)
        assert counts[0] < len(plain[0][step].micro_batches)  # packing packs
        for r in range(world):
            assert flat(packed[r][step]) == flat(plain[r][step])  # the same samples, masks, order
            for m in packed[r][step].micro_batches:  # stored tokens (before closing [SEP]s)
                assert int(m["cu_seqlens"][-1]) - (len(m["cu_seqlens"]) - 1) <= budget
        lengths = mixture.lengths(step * batch, batch)
        alone = {len(pack_rows(lengths[r * share:(r + 1) * share], budget)) for r in range(world)}
        balanced += len(alone) > 1
    assert balanced > 0  # on some steps the ranks alone would have packed unequally


def test_truncation_is_refused_unless_asked_for(tiny_prepared, tiny_tokenizer):
    with pytest.raises(ValueError, match="ettin never truncates silently"):
        StepBatches(tiny_prepared, seq_len=32, collator=mlm(tiny_tokenizer),
                    global_batch_at=lambda t: 4, micro_batch_size=2)
    steps = StepBatches(tiny_prepared, seq_len=32, collator=mlm(tiny_tokenizer),
                        global_batch_at=lambda t: 8, micro_batch_size=8, truncate=True)
    for step in take(steps, 5):
        batch = step.micro_batches[0]
        assert batch["max_seqlen"] <= 32  # cut to 31, then closed with [SEP]
        assert step.step_tokens <= 8 * 32


def test_validation_batches_are_fixed_and_split_across_ranks(tiny_prepared, tiny_tokenizer):
    collate = mlm(tiny_tokenizer)
    first = validation_batches(tiny_prepared, seq_len=TINY_SEQ_LEN, collator=collate, batch_size=4,
                               max_batches=3)
    again = list(ValidationBatches(tiny_prepared, seq_len=TINY_SEQ_LEN, collator=collate,
                                   batch_size=4, max_batches=3))
    assert len(first) == 3
    assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
               for a, b in zip(first, again))
    whole = validation_batches(tiny_prepared, seq_len=TINY_SEQ_LEN, collator=collate, batch_size=1)
    ranks = [validation_batches(tiny_prepared, seq_len=TINY_SEQ_LEN, collator=collate, batch_size=1,
                                rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) + len(ranks[1]) == len(whole) == len(PreparedSplit(tiny_prepared, "validation"))
    assert torch.equal(ranks[1][0]["input_ids"], whole[1]["input_ids"])  # masks follow the position
    # Capped at batch_size x max_batches samples in all: the same samples on any number of ranks.
    capped = validation_batches(tiny_prepared, seq_len=TINY_SEQ_LEN, collator=collate, batch_size=1,
                                max_batches=5)
    split = [validation_batches(tiny_prepared, seq_len=TINY_SEQ_LEN, collator=collate, batch_size=1,
                                max_batches=5, rank=r, world_size=2) for r in range(2)]
    assert len(capped) == 5 < len(whole) and [len(b) for b in split] == [3, 2]
    interleaved = [split[i % 2][i // 2] for i in range(5)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(interleaved, capped))


def test_no_shared_memory_or_files_left_behind(tiny_prepared, tiny_tokenizer):
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    listing = sorted(p.relative_to(tiny_prepared) for p in tiny_prepared.rglob("*"))
    take(loader(tiny_prepared, tiny_tokenizer, workers=2), 6)
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    # Nothing of ours. torch cleans its own; joblib's loky semaphores (sem.loky-<pid>-...) come from
    # other test processes running beside this one (the loader never uses joblib).
    assert not {n for n in after - before if "torch" not in n and not n.startswith("sem.loky-")}
    assert sorted(p.relative_to(tiny_prepared) for p in tiny_prepared.rglob("*")) == listing


def test_the_rows_digest_changes_when_the_same_rows_come_in_another_order():
    from ettin.data.loader import add_digests, rows_digest

    rows = [np.arange(5, 15), np.arange(20, 26), np.arange(7, 9)]
    in_order = rows_digest(list(enumerate(rows)), seq_len=16)
    swapped = rows_digest(list(enumerate([rows[1], rows[0], rows[2]])), seq_len=16)
    assert swapped != in_order
    # Positions name the rows, so the parts of two ranks (or two steps) add up to the whole.
    assert add_digests(rows_digest([(0, rows[0]), (2, rows[2])], 16), rows_digest([(1, rows[1])], 16)) \
        == in_order
