"""Masked diffusion (MDLM, Sahoo et al. 2024): the collator's mask-rate law (statistics with stated
tolerances), the loss as the MDLM bound (against a hand computation on a tiny model), its weights in an
objective mix and through the optimizer step's normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ettin.data.tokenizer import SpecialIds
from ettin.model.modernbert import ModernBert
from ettin.objectives import OBJECTIVES, ObjectiveMix
from ettin.objectives.collate import IGNORE_INDEX, CLMCollator, MDLMCollator, MixedCollator
from ettin.train.step import StepSettings, TrainStep

from test_model import VOCAB, make_loud, tiny_config

IDS = SpecialIds(cls=0, sep=1, pad=2, mask=3, unk=4, all=frozenset(range(10)))


def mdlm_row(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([[0], rng.integers(10, VOCAB, n - 2), [1]])


def test_mdlm_mask_rates_are_uniform_on_eps_to_one_and_stratified_in_blocks():
    collate = MDLMCollator(IDS, vocab_size=VOCAB, seed=3)
    s, eps = collate.STRATA, collate.EPS
    n = 40_000
    rates = np.array([collate.rate(k) for k in range(n)])
    assert rates.min() > eps and rates.max() <= 1.0
    # Uniform on (eps, 1]: every decile of it holds 10 % of the draws. Stratification makes the
    # counts nearly exact (each block of 8 puts one draw in each eighth), so 0.5 % is loose.
    u = (1.0 - rates) / (1.0 - eps)
    deciles = np.histogram(u, bins=10, range=(0, 1))[0] / n
    assert np.abs(deciles - 0.1).max() < 0.005
    # Each block of STRATA consecutive indices (aligned) holds exactly one draw per stratum.
    strata = np.floor(u * s).astype(int).reshape(-1, s)
    assert (np.sort(strata, axis=1) == np.arange(s)).all()
    # The stratum of index k is k mod STRATA, and the draws inside a stratum are uniform: the
    # within-stratum offsets have mean 1/2 (4 standard errors: sd 1/sqrt(12 n)).
    assert (strata == np.arange(s)).all()
    offsets = u * s - np.floor(u * s)
    assert abs(offsets.mean() - 0.5) < 4 / math.sqrt(12 * n)


def test_mdlm_masks_each_token_with_its_rows_rate_always_with_mask():
    collate = MDLMCollator(IDS, vocab_size=VOCAB, seed=11)
    rng = np.random.default_rng(0)
    fractions, rates = [], []
    for index in range(2000):
        row = mdlm_row(202, rng)
        inputs, labels = collate.example(index, row)
        targets = labels != IGNORE_INDEX
        # [CLS]/[SEP] never masked; every masked position is [MASK] with the original as its label;
        # every other position is unchanged (no random replacement, no kept-but-selected token).
        assert not targets[0] and not targets[-1]
        assert (inputs[targets] == IDS.mask).all() and (labels[targets] == row[targets]).all()
        assert (inputs[~targets] == row[~targets]).all()
        fractions.append(targets[1:-1].mean())
        rates.append(collate.rate(index))
    fractions, rates = np.array(fractions), np.array(rates)
    # Given t, the masked count of 200 maskable tokens is Binomial(200, t): the standardised
    # residuals have mean 0 and variance 1 (tolerances: 4 standard errors over 2000 rows).
    z = (fractions - rates) / np.sqrt(rates * (1 - rates) / 200 + 1e-12)
    assert abs(z.mean()) < 4 / math.sqrt(2000)
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / 2000)


def test_mdlm_batch_carries_one_over_t_per_target_and_the_rows_tokens():
    collate = MDLMCollator(IDS, vocab_size=VOCAB, seed=5)
    rng = np.random.default_rng(1)
    samples = [(k, mdlm_row(n, rng)) for k, n in zip(range(16, 20), (30, 7, 50, 12))]
    batch = collate(samples)
    starts = batch["cu_seqlens"].numpy()
    row_of = np.searchsorted(starts[1:], batch["target_index"].numpy(), side="right")
    expected = [1.0 / collate.rate(samples[r][0]) for r in row_of]
    assert np.allclose(batch["target_weight"].numpy(), expected)
    assert batch["loss_tokens"] == [sum(n - 2 for n in (30, 7, 50, 12))]  # all but [CLS], [SEP]


def mdlm_model() -> ModernBert:
    return make_loud(ModernBert(tiny_config(mask_token_id=3)), weight_std=0.2).eval()


@pytest.mark.parametrize("loss", ["plain", "chunked"])
def test_mdlm_loss_is_the_bound_computed_by_hand(loss):
    model = mdlm_model()
    model.loss_implementation, model.loss_chunk_tokens = loss, 5
    collate = MDLMCollator(IDS, vocab_size=VOCAB, seed=2)
    rng = np.random.default_rng(4)
    samples = [(k, mdlm_row(n, rng)) for k, n in zip(range(8), (20, 33, 9, 41, 16, 25, 12, 30))]
    batch = collate(samples)
    out = model(**batch, loss_reduction="mean")
    # By hand: each row alone through the model, without labels; the bound per token is
    # sum over rows of (1/t) x (cross-entropy summed over its masked positions), over the rows' tokens.
    numerator, tokens = 0.0, 0
    for index, row in samples:
        inputs, labels = collate.example(index, row)
        with torch.no_grad():
            logits = model(torch.from_numpy(inputs)[None]).logits[0]
        masked = torch.from_numpy(labels != IGNORE_INDEX)
        ce = F.cross_entropy(logits[masked].double(), torch.from_numpy(row)[masked], reduction="sum")
        numerator += float(ce) / collate.rate(index)
        tokens += len(row) - 2
    assert out.loss_tokens == [tokens]
    assert float(out.loss.detach()) == pytest.approx(numerator / tokens, rel=1e-5)
    # The objective reports it with its perplexity bound.
    metrics = OBJECTIVES["mdlm"].metrics("val", float(out.loss), 0.0, float(tokens))
    assert metrics == {"val/loss": pytest.approx(numerator / tokens, rel=1e-5),
                       "val/perplexity_bound": pytest.approx(math.exp(numerator / tokens), rel=1e-5)}


def test_chunked_weighted_loss_has_the_plain_gradients():
    collate = MDLMCollator(IDS, vocab_size=VOCAB, seed=9)
    rng = np.random.default_rng(2)
    batch = collate([(k, mdlm_row(n, rng)) for k, n in zip(range(4), (20, 31, 17, 9))])
    grads = {}
    for loss in ("plain", "chunked"):
        model = mdlm_model()
        model.loss_implementation, model.loss_chunk_tokens = loss, 4
        model(**batch, loss_reduction="sum").loss.backward()
        grads[loss] = torch.cat([p.grad.flatten() for p in model.parameters()])
    # fp32 sums in another order: agreement to 1e-6 of the largest gradient.
    scale = float(grads["plain"].abs().max())
    assert torch.allclose(grads["plain"], grads["chunked"], rtol=1e-4, atol=1e-6 * scale)


def test_mdlm_in_a_mix_weights_its_targets_and_averages_over_its_tokens():
    mix = ObjectiveMix.of({"mlm": 1.0, "mdlm": 1.0})
    assert mix.side == "encoder" and not mix.objective.causal
    mdlm = MDLMCollator(IDS, vocab_size=VOCAB, seed=1)
    clm = CLMCollator(IDS, vocab_size=VOCAB)
    collate = MixedCollator([clm, mdlm], [0.5, 0.5], [True, False], seed=1)
    rng = np.random.default_rng(3)
    samples = [(k, mdlm_row(n, rng)) for k, n in zip(range(12), [14, 22, 9, 30, 11, 19] * 2)]
    batch = collate(samples)
    members = [collate.choice(k) for k, _ in samples]
    assert set(members) == {0, 1}
    groups = batch["target_groups"]
    weights = batch["target_weight"].numpy()
    assert (weights[:groups[0]] == 1.0).all()  # CLM's targets weigh 1
    mdlm_rows = [(k, r) for (k, r), m in zip(samples, members) if m == 1]
    expected = sorted(1 / mdlm.rate(k) for k, r in mdlm_rows for _ in range(
        int((mdlm.example(k, r)[1] != IGNORE_INDEX).sum())))
    assert np.allclose(np.sort(weights[groups[0]:]), expected)
    clm_targets = sum(len(r) - 1 for (k, r), m in zip(samples, members) if m == 0)
    assert batch["loss_tokens"] == [clm_targets, sum(len(r) - 2 for _, r in mdlm_rows)]
    # The step averages each member over its loss_tokens: MDLM's bound, CLM's mean.
    model = mdlm_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    step = TrainStep(model, optimizer, StepSettings(lr=0.0, lr_multiplier=lambda t: 1.0, peak_lr=1.0,
                                                    group_weights=(0.5, 0.5)))
    from ettin.data.loader import StepBatch, LoaderState

    step_batch = StepBatch([batch], LoaderState(1, 12, 0), 12, 0).count_on_host()
    assert step_batch.group_targets == [batch["loss_tokens"]]
    result = step([batch], tokens_before=0, targets=step_batch.targets, rows=step_batch.rows,
                  group_targets=step_batch.group_targets)
    assert result.global_targets.tolist() == batch["loss_tokens"]
