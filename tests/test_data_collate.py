"""Collators: exact CLM/MNTP labels on hand-made rows, MLM statistics over >= 100k tokens, and masks
that depend on (seed, global sample index) only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ettin.objectives.collate import CLMCollator, MLMCollator, MNTPCollator
from ettin.data.tokenizer import SpecialIds

# A hand-made vocabulary: 0-4 specials, 5-9 unused padding tokens, 10-99 ordinary tokens.
IDS = SpecialIds(cls=0, sep=1, pad=2, mask=3, unk=4, all=frozenset(range(10)))
V = 100
X = -100


def test_clm_labels_are_the_next_token_within_each_row():
    collate = CLMCollator(IDS, unpadded=False)
    rows = [(0, np.array([0, 11, 12, 13, 1])),  # a whole document: [CLS] a b c [SEP]
            (1, np.array([0, 21, 22]))]  # a middle chunk: no [SEP], nothing after it in this row
    out = collate(rows)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert out["input_ids"].tolist() == [[0, 11, 12, 13, 1], [0, 21, 22, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert out["labels"].tolist() == [[11, 12, 13, 1, X], [21, 22, X, X, X]]
    flat = CLMCollator(IDS)(rows)
    assert set(flat) == {"input_ids", "cu_seqlens", "max_seqlen", "labels", "target_index"}
    assert flat["input_ids"].tolist() == [0, 11, 12, 13, 1, 0, 21, 22]
    assert flat["labels"].tolist() == [11, 12, 13, 1, X, 21, 22, X]  # never across rows
    assert flat["target_index"].tolist() == [0, 1, 2, 3, 5, 6]  # the labelled stream positions
    assert flat["target_index"].dtype == torch.long
    assert flat["cu_seqlens"].dtype == torch.int32 and flat["cu_seqlens"].tolist() == [0, 5, 8]
    assert flat["max_seqlen"] == 5
    assert flat["input_ids"].dtype == torch.long and flat["labels"].dtype == torch.long


def test_mntp_labels_sit_one_position_before_the_masked_token():
    # mask_rate ~ 1: every non-special token is selected, so the expected labels are known exactly.
    collate = MNTPCollator(IDS, vocab_size=V, mask_rate=0.999999, seed=0, unpadded=False)
    out = collate([(0, np.array([0, 11, 12, 13, 1])), (1, np.array([0, 21, 22]))])
    # Encoder rows are closed with [SEP]; position j-1 predicts token j.
    assert out["labels"].tolist() == [[11, 12, 13, X, X], [21, 22, X, X, X]]
    inputs = out["input_ids"].tolist()
    assert inputs[0][0] == 0 and inputs[0][-1] == 1 and inputs[1][:1] == [0] and inputs[1][3] == 1
    # The same masking as MLM with the same seed, labels shifted by one.
    mlm = MLMCollator(IDS, vocab_size=V, mask_rate=0.3, seed=5)
    mntp = MNTPCollator(IDS, vocab_size=V, mask_rate=0.3, seed=5)
    row = np.arange(10, 60)
    row[0] = 0
    (a_in, a_lab), (b_in, b_lab) = mlm.example(17, row), mntp.example(17, row)
    assert np.array_equal(a_in, b_in)
    assert np.array_equal(b_lab, np.append(a_lab[1:], X))
    selected = np.flatnonzero(a_lab != X)
    assert len(selected) and np.array_equal(b_lab[selected - 1], np.append(row, 1)[selected])


def test_mlm_labels_on_a_hand_made_row():
    collate = MLMCollator(IDS, vocab_size=V, mask_rate=0.999999, seed=1, unpadded=False)
    out = collate([(3, np.array([0, 11, 12, 13, 1]))])
    assert out["labels"].tolist() == [[X, 11, 12, 13, X]]  # specials never selected
    assert out["input_ids"][0, 0] == 0 and out["input_ids"][0, -1] == 1


def test_mlm_statistics_over_200k_tokens():
    rate = 0.3
    collate = MLMCollator(IDS, vocab_size=V, mask_rate=rate, seed=123)
    rng = np.random.default_rng(0)
    rows = []
    for index in range(1600):
        body = rng.integers(5, V, 126)  # includes unused ids 5-9, which are special
        rows.append((index, np.concatenate(([0], body, [1]))))
    inputs, labels, originals = [], [], []
    for index, row in rows:
        i, l = collate.example(index, row)
        inputs.append(i), labels.append(l), originals.append(row)
    inputs, labels, originals = map(np.concatenate, (inputs, labels, originals))
    assert len(originals) >= 200_000
    special = np.isin(originals, list(IDS.all))
    selected = labels != X
    assert not (selected & special).any()  # [CLS] [SEP] and unused ids are never selected
    assert np.array_equal(labels[selected], originals[selected])
    assert abs(selected.sum() / (~special).sum() - rate) < 0.005
    n = selected.sum()
    to_mask = (inputs == IDS.mask) & selected
    kept = (inputs == originals) & selected
    replaced = selected & ~to_mask & ~kept
    assert abs(to_mask.sum() / n - 0.8) < 0.01
    # A random replacement may draw the original token (1 in 90 here): count it as "kept".
    assert abs(kept.sum() / n - (0.1 + 0.1 / 90)) < 0.01
    assert abs(replaced.sum() / n - (0.1 - 0.1 / 90)) < 0.01
    assert not np.isin(inputs[replaced], list(IDS.all)).any()  # replacements are never special
    assert np.array_equal(inputs[~selected], originals[~selected])
    # Every non-special id can be drawn as a replacement.
    assert set(inputs[replaced].tolist()) == set(range(10, V))


def test_masks_depend_on_seed_and_sample_index_only():
    a = MLMCollator(IDS, vocab_size=V, mask_rate=0.3, seed=7)
    b = MLMCollator(IDS, vocab_size=V, mask_rate=0.3, seed=7)
    row = np.concatenate(([0], np.arange(10, 90), [1]))
    batch_a = a([(5, row), (6, row)])
    batch_b = b([(6, row)])  # sample 6 alone, in another batch, another collator object
    n = len(row)
    assert torch.equal(batch_a["input_ids"][n:], batch_b["input_ids"])
    assert torch.equal(batch_a["labels"][n:], batch_b["labels"])
    assert not torch.equal(batch_a["labels"][:n], batch_a["labels"][n:])  # other index, other mask
    c = MLMCollator(IDS, vocab_size=V, mask_rate=0.3, seed=8)
    assert not torch.equal(c([(6, row)])["labels"], batch_b["labels"])


def test_padded_and_unpadded_hold_the_same_rows():
    collate_p = MLMCollator(IDS, vocab_size=V, mask_rate=0.3, seed=1, unpadded=False)
    collate_u = MLMCollator(IDS, vocab_size=V, mask_rate=0.3, seed=1)
    samples = [(i, np.concatenate(([0], np.arange(10, 10 + 3 * i + 2)))) for i in range(5)]
    padded, flat = collate_p(samples), collate_u(samples)
    keep = padded["attention_mask"].bool()
    assert torch.equal(padded["input_ids"][keep], flat["input_ids"])
    assert torch.equal(padded["labels"][keep], flat["labels"])
    assert (padded["labels"][~keep] == X).all() and (padded["input_ids"][~keep] == IDS.pad).all()
    assert torch.equal(keep.sum(1).int(), torch.diff(flat["cu_seqlens"]))
    assert torch.equal(flat["target_index"], (flat["labels"] != X).nonzero().squeeze(1))
    assert 0 < len(flat["target_index"]) < len(flat["labels"])
    assert flat["max_seqlen"] == padded["input_ids"].shape[1]


def test_encoder_rows_are_closed_and_decoder_rows_are_not():
    row = np.array([0, 11, 12])  # a chunk that does not end its document
    assert MLMCollator(IDS, vocab_size=V, mask_rate=0.1, seed=0).row(row).tolist() == [0, 11, 12, 1]
    assert MLMCollator(IDS, vocab_size=V, mask_rate=0.1, seed=0).row([0, 11, 1]).tolist() == [0, 11, 1]
    assert CLMCollator(IDS).row(row).tolist() == [0, 11, 12]
    assert MLMCollator(IDS, vocab_size=V, mask_rate=0.1, seed=0, close_rows=False).row(row).tolist() \
        == [0, 11, 12]


def test_bad_inputs_to_collators():
    with pytest.raises(ValueError, match="mask_rate"):
        MLMCollator(IDS, vocab_size=V, mask_rate=1.5, seed=0)
    no_mask = SpecialIds(cls=0, sep=1, pad=None, mask=None, unk=None, all=frozenset({0, 1}))
    with pytest.raises(ValueError, match=r"no \[MASK\] token"):
        MLMCollator(no_mask, vocab_size=V, mask_rate=0.3, seed=0)
    with pytest.raises(ValueError, match="token id 500 is outside the tokenizer's 100 ids: the data was "
                                         "prepared with another tokenizer"):
        MLMCollator(IDS, vocab_size=V, mask_rate=0.3, seed=0)([(0, np.array([0, 500, 1]))])
    with pytest.raises(ValueError, match="token id 100 is outside the tokenizer's 100 ids: the data was "
                                         "prepared with another tokenizer"):
        CLMCollator(IDS, vocab_size=V)([(0, np.array([0, 11, 1])), (1, np.array([0, 100]))])
    assert CLMCollator(IDS, vocab_size=V)([(0, np.array([0, 99, 1]))])["input_ids"].tolist() == [0, 99, 1]
    # No [PAD]: padded batches pad with [SEP] (masked out by attention_mask and labels anyway).
    out = CLMCollator(no_mask, unpadded=False)([(0, np.array([0, 11, 1])), (1, np.array([0]))])
    assert out["input_ids"].tolist() == [[0, 11, 1], [0, 1, 1]]
