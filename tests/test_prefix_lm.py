"""Attention as part of an objective, proven by prefix_lm (T5's prefix LM; UL2's S-denoiser): every
backend's mask against a dense reference mask built here, independently, query by query; the FLOP
count against the pairs of that reference; the collator's prefix law and labels by hand; the refusals
of what cannot express a prefix (flash, transformers' classes, a pair)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from ettin.data.tokenizer import SpecialIds
from ettin.model.config import ModelConfig
from ettin.model.flops import attention_pairs, forward_flops
from ettin.model.modernbert import Layout
from ettin.objectives import OBJECTIVES, SIDES, Attention, ExportRefused, ObjectiveMix
from ettin.objectives.collate import IGNORE_INDEX, CLMCollator, MixedCollator, MLMCollator, PrefixLMCollator

from test_model import BACKENDS, cu_seqlens_of, flat_documents, loud_model, observed_visibility

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")

IDS = SpecialIds(cls=0, sep=1, pad=2, mask=3, unk=4, all=frozenset(range(5)))


def reference_mask(lengths, causal, prefix, window) -> torch.Tensor:
    """[N, N] by the definition, one pair at a time: same row; a bidirectional row sees every key; a
    causal row sees keys at or before the query and keys inside its prefix; a sliding layer only
    keys within ``window`` positions."""
    rows = [(r, pos) for r, n in enumerate(lengths) for pos in range(n)]
    mask = torch.zeros(len(rows), len(rows), dtype=torch.bool)
    for i, (row_q, q) in enumerate(rows):
        for j, (row_k, k) in enumerate(rows):
            seen = row_q == row_k and (not causal[row_q] or k <= q or k < prefix[row_q])
            mask[i, j] = seen and (window is None or abs(q - k) <= window)
    return mask


# Rows of every kind in one stream; prefixes at both ends and inside, rows longer than the band's
# blocks (window 3: blocks of 8) so sdpa's sliding layers take the band path.
LENGTHS = [9, 14, 1, 12, 6]
CAUSAL = [True, True, True, False, True]
PREFIX = [4, 13, 1, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", ["prefix only", "mixed"])
def test_every_backend_attends_exactly_the_reference_prefix_mask(backend, rows):
    if rows == "prefix only":  # one direction (causal) for every row, each its own prefix
        lengths, causal, prefix = [9, 14, 1, 12], True, [4, 13, 1, 0]
        directions = [True] * 4
    else:
        lengths, causal, prefix = LENGTHS, torch.tensor(CAUSAL), PREFIX
        directions = CAUSAL
    layout = Layout(cu_seqlens_of(lengths), max(lengths), causal, 3, prefix=torch.tensor(prefix))
    assert layout.use_band() and not layout.only_backwards  # the band looks ahead for the prefix
    qkv = torch.randn(sum(lengths), 3, 2, 16, generator=torch.Generator().manual_seed(0))
    for sliding in (False, True):
        expected = reference_mask(lengths, directions, prefix, 3 if sliding else None)
        assert torch.equal(observed_visibility(qkv, layout, sliding, backend), expected), f"sliding={sliding}"


def test_the_grid_and_band_masks_equal_the_reference_on_local_layers():
    """The mask tensors themselves (sdpa's band and the sdpa / eager grid), not only their effect."""
    lengths, prefix = [9, 14, 1, 12], [4, 13, 1, 0]
    layout = Layout(cu_seqlens_of(lengths), max(lengths), True, 3, prefix=torch.tensor(prefix))
    expected = reference_mask(lengths, [True] * 4, prefix, 3)
    block, keys, band = layout.band()
    n = sum(lengths)
    from_band = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for slot in range(keys):
            k = (q // block) * block - 3 + slot
            if 0 <= k < n:
                from_band[q, k] |= bool(band[q // block, 0, q % block, slot])
    assert torch.equal(from_band, expected)
    grid = layout.grid_mask(sliding=True)[:, 0]  # [rows, T, T]
    starts = cu_seqlens_of(lengths)[:-1].tolist()
    for r, (start, length) in enumerate(zip(starts, lengths)):
        rows = slice(start, start + length)
        assert torch.equal(grid[r, :length, :length], expected[rows, rows])


def test_a_prefix_of_zero_is_causal_and_a_full_prefix_bidirectional():
    model = loud_model(attn_implementation="sdpa")
    lengths = [9, 14, 5]
    ids, cu_seqlens = flat_documents(lengths)
    with torch.no_grad():
        causal = model(ids, cu_seqlens=cu_seqlens, causal=True).logits
        bidirectional = model(ids, cu_seqlens=cu_seqlens, causal=False).logits
        torch.testing.assert_close(
            model(ids, cu_seqlens=cu_seqlens, causal=True, prefix_lengths=torch.zeros(3, dtype=torch.long)).logits,
            causal)
        torch.testing.assert_close(
            model(ids, cu_seqlens=cu_seqlens, causal=True, prefix_lengths=torch.tensor(lengths)).logits,
            bidirectional)


def test_flops_count_the_pairs_of_the_reference_mask():
    for n in (1, 2, 7, 12):
        for window in (None, 0, 3, 20):
            for p in (0, 1, n // 2, n):
                expected = int(reference_mask([n], [True], [p], window).sum())
                assert attention_pairs(n, window, True, p) == expected, (n, window, p)
            assert attention_pairs(n, window, False) == int(reference_mask([n], [False], [0], window).sum())
    config = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=2, window=3)
    causal, bidirectional = (forward_flops(config, [12], 5, c) for c in (True, False))
    assert causal < forward_flops(config, [12], 5, True, [6]) < bidirectional
    assert forward_flops(config, [12], 5, True, [12]) == bidirectional


def rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(100 + i, np.concatenate(([IDS.cls], rng.integers(5, 97, n - 1)))) for i, n in enumerate(lengths)]


def test_prefix_lengths_are_uniform_on_one_to_n_minus_one_and_a_function_of_seed_and_index():
    collator = PrefixLMCollator(IDS, vocab_size=97, seed=7)
    drawn = [collator.prefix_length(index, 6) for index in range(5000)]
    counts = np.bincount(drawn, minlength=6)
    assert counts[0] == 0 and counts[1:].min() > 900  # 1..5 each ~1000 (binomial sd ~28)
    assert drawn == [PrefixLMCollator(IDS, vocab_size=97, seed=7).prefix_length(i, 6) for i in range(5000)]
    assert drawn != [PrefixLMCollator(IDS, vocab_size=97, seed=8).prefix_length(i, 6) for i in range(5000)]
    assert collator.prefix_length(3, 1) == 1  # a one-token row: all prefix, no target


def test_the_loss_is_next_token_prediction_after_the_prefix_only():
    samples = rows([9, 1, 5])
    batch = PrefixLMCollator(IDS, vocab_size=97, seed=1)(samples)
    prefixes = batch["prefix_lengths"].tolist()
    expected = []
    for (_, tokens), p in zip(samples, prefixes):
        expected += [int(tokens[i + 1]) if p - 1 <= i < len(tokens) - 1 else IGNORE_INDEX
                     for i in range(len(tokens))]
    assert batch["labels"].tolist() == expected
    assert batch["target_index"].tolist() == [i for i, label in enumerate(expected) if label != IGNORE_INDEX]


def test_a_mix_with_prefix_lm_gives_each_prefix_row_its_prefix():
    collators = [MLMCollator(IDS, vocab_size=97, mask_rate=0.3, seed=1),
                 PrefixLMCollator(IDS, vocab_size=97, seed=1)]
    mixed = MixedCollator(collators, [1, 1], [False, True], seed=1)
    samples = rows([9, 6, 12, 7, 8, 10])
    batch = mixed(samples)
    members = [mixed.choice(index) for index, _ in samples]
    assert set(members) == {0, 1}
    assert batch["causal"].tolist() == [m == 1 for m in members]
    assert batch["prefix_lengths"].tolist() == [collators[1].prefix_length(index, len(tokens)) if m else 0
                                                for m, (index, tokens) in zip(members, samples)]
    assert "prefix_lengths" not in MixedCollator([collators[0], CLMCollator(IDS, vocab_size=97)], [1, 1],
                                                 [False, True], seed=1)(samples)


def test_flash_refuses_a_prefix_naming_the_fix(monkeypatch):
    import ettin.model.modernbert as modernbert

    layout = Layout(cu_seqlens_of([3, 4]), 4, True, 2, prefix=torch.tensor([2, 1]))
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=None))
    with pytest.raises(ValueError, match=r"prefix.*attn_implementation='sdpa' or 'flex'"):
        modernbert.flash_attention(torch.zeros(7, 3, 2, 8), layout, sliding=False, dropout=0.0)


def test_the_export_class_comes_from_the_registry_and_a_prefix_is_refused_with_the_choices():
    assert OBJECTIVES["mlm"].export_class() == OBJECTIVES["mntp"].export_class() == "ModernBertForMaskedLM"
    assert OBJECTIVES["clm"].export_class() == "ModernBertDecoderForCausalLM"
    assert OBJECTIVES["prefix_lm"].attention is Attention.PREFIX
    with pytest.raises(ExportRefused, match=r"neither ModernBertForMaskedLM.*export_as=encoder or export_as=decoder"):
        OBJECTIVES["prefix_lm"].export_class()
    assert OBJECTIVES["prefix_lm"].export_class("decoder") == SIDES["decoder"]
    assert ObjectiveMix.of({"prefix_lm": 1}).side is None
    assert ObjectiveMix.of({"prefix_lm": 1}, export_as="encoder").export_class == SIDES["encoder"]
    assert ObjectiveMix.of({"mlm": 3, "prefix_lm": 1}, export_as="decoder").export_class == SIDES["decoder"]
