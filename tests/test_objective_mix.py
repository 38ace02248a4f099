"""Objective mix (GPT-BERT, arXiv 2410.24159): each row of a batch trains one objective of a weighted
mix, with its own attention direction, in one forward. Checked against independent references: the
same rows forwarded separately in their own direction, transformers' ModernBertForMaskedLM and
ModernBertDecoderForCausalLM on the same weights, losses computed by hand, numpy's binomial bounds, and
an uninterrupted run for resume."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ModernBertDecoderConfig, ModernBertDecoderForCausalLM

from ettin.data.tokenizer import SpecialIds
from ettin.model.hub import convert_state_dict
from ettin.model.modernbert import Layout, ModernBert
from ettin.objectives import OBJECTIVES, ObjectiveMix
from ettin.objectives.collate import CLMCollator, MixedCollator, MLMCollator
from ettin.train.config import ConfigError, compose
from ettin.train.step import StepSettings, TrainStep
from data_fixtures import data_root, tiny_tokenizer  # noqa: F401

from test_model import (BACKENDS, GLOBAL_SLIDING_SLIDING_GLOBAL as GSSG, PAD, VOCAB, assert_logits_close,
                        cu_seqlens_of, encoder_pair, flat_documents, loud_model, make_loud, tiny_config)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")

# Rows of different lengths (the grid has padding) whose sliding layers take sdpa's band path, and
# equal rows (the uniform grid, no padding).
RAGGED = [9, 31, 4, 17, 2, 12]
EQUAL = [16, 16, 16, 16]
DIRECTIONS = {"ragged": (RAGGED, [True, False, False, True, False, True]),
              "equal": (EQUAL, [False, True, True, False])}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# The model: one forward, each row in its own direction


@pytest.mark.parametrize("rows", list(DIRECTIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_with_mixed_directions_equals_separate_forwards_of_its_rows(backend, rows):
    lengths, causal = DIRECTIONS[rows]
    model = loud_model(attn_implementation=backend)
    ids, cu_seqlens = flat_documents(lengths)
    if rows == "ragged" and backend == "sdpa":
        assert Layout(cu_seqlens, max(lengths), torch.tensor(causal), model.config.window).use_band()
    with torch.no_grad():
        mixed = model(ids, cu_seqlens=cu_seqlens, causal=torch.tensor(causal)).logits
        for (start, end), direction in zip(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()), causal):
            alone = model(ids[None, start:end], causal=direction).logits[0]
            assert_logits_close(mixed[start:end], alone)
        # Negative control: the rows' directions matter (all bidirectional differs on causal rows).
        uniform = model(ids, cu_seqlens=cu_seqlens, causal=False).logits
    causal_tokens = torch.repeat_interleave(torch.tensor(causal), torch.tensor(lengths))
    assert (mixed[causal_tokens] - uniform[causal_tokens]).abs().max() > 0.1
    torch.testing.assert_close(mixed[~causal_tokens], uniform[~causal_tokens], rtol=1e-5, atol=1e-5)


def test_mixed_rows_match_transformers_encoder_and_decoder_on_the_same_weights():
    """Bidirectional rows are ModernBertForMaskedLM's output, causal rows ModernBertDecoderForCausalLM's
    (transformers 4.x decoders use one theta: both thetas equal here)."""
    config = tiny_config(local_rope_theta=GSSG["global_rope_theta"])
    ours, encoder = encoder_pair(config, "eager")
    c = config
    decoder = ModernBertDecoderForCausalLM._from_config(ModernBertDecoderConfig(
        vocab_size=VOCAB, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        global_attn_every_n_layers=c.global_attn_every_n_layers, local_attention=2 * (c.window + 1),
        global_rope_theta=c.global_rope_theta, local_rope_theta=c.local_rope_theta,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
        attn_implementation="eager").eval()
    decoder.load_state_dict(convert_state_dict(ours.state_dict(), to="decoder"), strict=False)
    lengths, causal = DIRECTIONS["ragged"]
    ids, cu_seqlens = flat_documents(lengths)
    with torch.no_grad():
        mixed = ours(ids, cu_seqlens=cu_seqlens, causal=torch.tensor(causal)).logits
        for (start, end), direction in zip(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()), causal):
            theirs = decoder(input_ids=ids[None, start:end], use_cache=False) if direction \
                else encoder(input_ids=ids[None, start:end])
            assert_logits_close(mixed[start:end], theirs.logits[0])


def test_padded_input_takes_a_direction_per_row():
    model = loud_model()
    lengths, causal = DIRECTIONS["ragged"]
    ids, cu_seqlens = flat_documents(lengths)
    padded = torch.full((len(lengths), max(lengths)), PAD)
    mask = torch.zeros_like(padded)
    for row, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        padded[row, : end - start], mask[row, : end - start] = ids[start:end], 1
    with torch.no_grad():
        flat = model(ids, cu_seqlens=cu_seqlens, causal=torch.tensor(causal)).logits
        assert_logits_close(model(padded, mask, causal=torch.tensor(causal)).logits[mask.bool()], flat)


def test_gradients_of_a_mixed_batch_are_those_of_separate_forwards():
    model = make_loud(ModernBert(tiny_config()), weight_std=0.2)
    lengths, causal = DIRECTIONS["ragged"]
    ids, cu_seqlens = flat_documents(lengths)
    labels = torch.where(torch.rand(len(ids), generator=torch.Generator().manual_seed(5)) < 0.5, ids, -100)

    def gradients(loss_of):
        model.zero_grad()
        loss_of().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    mixed = gradients(lambda: model(ids, cu_seqlens=cu_seqlens, labels=labels, causal=torch.tensor(causal),
                                    loss_reduction="sum").loss)
    bounds = list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))
    separate = gradients(lambda: sum(model(ids[a:b], cu_seqlens=cu_seqlens_of([b - a]), labels=labels[a:b],
                                           causal=c, loss_reduction="sum").loss
                                     for (a, b), c in zip(bounds, causal)))
    for name, expected in separate.items():  # within 1e-5 of each tensor's largest entry
        assert expected.abs().max() > 0, name
        assert_logits_close(mixed[name], expected)


def test_flash_refuses_mixed_directions_naming_the_fix(monkeypatch):
    import ettin.model.modernbert as modernbert

    layout = Layout(cu_seqlens_of([3, 4]), 4, torch.tensor([True, False]), 2)
    # flash-attn is GPU-only: a stand-in module, so the refusal (before any kernel call) runs here.
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=None))
    with pytest.raises(ValueError, match="attn_implementation='sdpa' or 'flex'"):
        modernbert.flash_attention(torch.zeros(7, 3, 2, 8), layout, sliding=False, dropout=0.0)


@pytest.mark.parametrize("loss", ["plain", "chunked"])
def test_target_groups_give_each_groups_loss_sum(loss):
    model = loud_model(weight_std=0.2)
    model.loss_implementation, model.loss_chunk_tokens = loss, 3
    lengths = [6, 5, 7]
    ids, cu_seqlens = flat_documents(lengths)
    labels = torch.where(torch.arange(len(ids)) % 2 == 0, ids, -100)
    positions = torch.nonzero(labels != -100).squeeze(1)
    group = (positions >= 6).long()  # the first row's targets, then the others'
    order = torch.argsort(group, stable=True)
    with torch.no_grad():
        out = model(ids, cu_seqlens=cu_seqlens, max_seqlen=7, labels=labels, causal=False,
                    target_index=positions[order], target_groups=group.bincount().tolist(),
                    loss_reduction="sum")
        logits = model(ids, cu_seqlens=cu_seqlens, causal=False).logits[positions]
    token_loss = torch.nn.functional.cross_entropy(logits, ids[positions], reduction="none")
    expected = torch.stack([token_loss[group == g].sum() for g in (0, 1)])
    torch.testing.assert_close(out.group_loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.sum(), rtol=1e-5, atol=1e-5)
    right = logits.argmax(-1) == ids[positions]
    assert out.group_correct.tolist() == [int(right[group == g].sum()) for g in (0, 1)]


# ---------------------------------------------------------------------------------------------------
# The collator: each row's objective from its global sample index

IDS = SpecialIds(cls=1, sep=2, pad=0, mask=3, unk=None, all=frozenset({0, 1, 2, 3}))


def mixed_collator(weights=(15.0, 1.0), seed=21):
    members = [MLMCollator(IDS, vocab_size=VOCAB, mask_rate=0.3, seed=seed), CLMCollator(IDS, vocab_size=VOCAB)]
    total = sum(weights)
    return MixedCollator(members, [w / total for w in weights], [False, True], seed=seed)


def sample(index: int, length: int = 12) -> tuple[int, np.ndarray]:
    rng = np.random.default_rng(index)
    return index, np.concatenate([[IDS.cls], rng.integers(4, VOCAB, length - 1)])


# 20,000 rows at p = 1/16: the count's standard deviation is sqrt(n p (1 - p)) = 34 rows; 5 standard
# deviations, 171 rows, is 0.0086 of the share.
SHARE_TOLERANCE = 0.0086


def test_rows_take_objectives_in_the_weights_proportion_deterministically():
    collator = mixed_collator()
    choices = np.array([collator.choice(i) for i in range(20_000)])
    assert abs(choices.mean() - 1 / 16) < SHARE_TOLERANCE, choices.mean()
    # A function of (seed, index): another collator agrees; another seed does not.
    assert [mixed_collator().choice(i) for i in range(200)] == choices[:200].tolist()
    assert [mixed_collator(seed=22).choice(i) for i in range(200)] != choices[:200].tolist()
    even = mixed_collator(weights=(1.0, 1.0))
    assert abs(np.mean([even.choice(i) for i in range(20_000)]) - 0.5) < 0.018  # 5 sd of 0.0035


def test_a_mixed_batch_is_each_row_collated_by_its_objective():
    collator = mixed_collator(weights=(1.0, 1.0))
    samples = [sample(i) for i in range(40, 48)]
    batch = collator(samples)
    members = [collator.choice(i) for i, _ in samples]
    assert 0 < sum(members) < len(members)  # both objectives in the batch
    assert batch["causal"].tolist() == [bool(m) for m in members]
    # Each row is its own collator's: inputs and labels.
    starts = batch["cu_seqlens"].tolist()
    for row, ((index, tokens), member) in enumerate(zip(samples, members)):
        own = collator.collators[member].example(index, tokens)
        np.testing.assert_array_equal(batch["input_ids"][starts[row]:starts[row + 1]].numpy(), own[0])
        np.testing.assert_array_equal(batch["labels"][starts[row]:starts[row + 1]].numpy(), own[1])
    # target_index lists the MLM rows' targets, then the CLM rows', each ascending.
    mlm, clm = batch["target_groups"]
    labelled = np.flatnonzero(batch["labels"].numpy() != -100)
    row_of = np.searchsorted(starts[1:], labelled, side="right")
    expected = [p for m in (0, 1) for p, r in zip(labelled, row_of) if members[r] == m]
    assert batch["target_index"].tolist() == expected and mlm + clm == len(labelled)
    # Rows sharing one direction give a plain bool: the model's uniform fast paths.
    only_mlm = [s for s, m in zip(samples, members) if m == 0]
    assert collator(only_mlm)["causal"] is False


# ---------------------------------------------------------------------------------------------------
# The step: each objective's mean over its targets, summed by weight


def test_the_step_minimises_the_weighted_sum_of_each_objectives_mean_loss():
    collator = mixed_collator(weights=(3.0, 1.0))
    micro_batches = [collator([sample(i, 10 + i % 5) for i in range(k, k + 4)]) for k in (0, 4)]
    groups = [mb["target_groups"] for mb in micro_batches]
    assert all(sum(g) > 0 for g in zip(*groups))  # both objectives in the step
    model = make_loud(ModernBert(tiny_config()), weight_std=0.2)
    reference = make_loud(ModernBert(tiny_config()), weight_std=0.2)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     StepSettings(lr=0.1, lr_multiplier=lambda t: 1.0, peak_lr=0.1, group_weights=(0.75, 0.25)))
    result = step(micro_batches, tokens_before=0, targets=[sum(g) for g in groups], rows=[4, 4],
                  group_targets=groups)

    # By hand: every row forwarded alone in its objective's direction, losses gathered per objective.
    sums, counts = torch.zeros(2), torch.zeros(2)
    for mb in micro_batches:
        bounds = zip(mb["cu_seqlens"][:-1].tolist(), mb["cu_seqlens"][1:].tolist())
        directions = mb["causal"].tolist() if isinstance(mb["causal"], torch.Tensor) else [mb["causal"]] * 4
        for (a, b), causal in zip(bounds, directions):
            labels = mb["labels"][a:b]
            out = reference(mb["input_ids"][a:b], cu_seqlens=cu_seqlens_of([b - a]), labels=labels,
                            causal=causal, loss_reduction="sum")
            sums[int(causal)] += out.loss
            counts[int(causal)] += int((labels != -100).sum())
    (0.75 * sums[0] / counts[0] + 0.25 * sums[1] / counts[1]).backward()
    torch.testing.assert_close(result.loss_sum, sums.detach(), rtol=1e-5, atol=1e-5)
    assert result.global_targets.tolist() == counts.tolist()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_mix_metrics_are_per_objective_and_the_weighted_sum():
    mix = ObjectiveMix.of({"mlm": 15, "clm": 1}, export_as="encoder")
    metrics = mix.metrics("train", [30.0, 8.0], [5.0, 1.0], [10.0, 4.0])
    assert metrics["train/loss"] == pytest.approx(15 / 16 * 3.0 + 1 / 16 * 2.0)
    assert metrics["train/mlm/loss"] == 3.0 and metrics["train/mlm/masked_accuracy"] == 0.5
    assert metrics["train/clm/loss"] == 2.0 and metrics["train/clm/perplexity"] == pytest.approx(np.exp(2.0))
    assert set(metrics) == set(mix.train_metric_names())
    assert mix.name == "mlm:15+clm:1" and mix.objective is OBJECTIVES["mlm"] and mix.weights == (15 / 16, 1 / 16)
    assert ObjectiveMix.of({"mlm": 15, "clm": 1}, export_as="decoder").objective is OBJECTIVES["clm"]


# ---------------------------------------------------------------------------------------------------
# Configuration

SHORT = ["pair=false", "trainer.log_every_steps=1", "trainer.num_workers=0", "eval_at_end=false",
         "export_at_end=false"]
GPT_BERT = ["objective_mix={mlm: 15, clm: 1}", "export_as=encoder"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("mix")


def config(workspace: Path, name: str, *extra: str):
    return compose("smoke", [f"output_dir={workspace / 'runs'}", f"data_dir={workspace / 'data'}",
                             f"run_name={name}", *SHORT, *extra])


@pytest.mark.parametrize("overrides, message", [
    (["objective_mix={mlm: 15, nope: 1}", "export_as=encoder"], r"'nope' of the mix is unknown.*mlm, clm, mntp"),
    (["objective_mix={mlm: 15, clm: 0}", "export_as=encoder"], r"'clm' has weight 0.0.*must be positive"),
    (["objective_mix={mlm: 15, clm: 1}"], r"mlm:15\+clm:1.*set export_as=encoder or export_as=decoder"),
    (["objective_mix={mlm: 1, mntp: 1}", "export_as=decoder"], r"choose export_as=encoder"),
    ([*GPT_BERT, "model.attn_implementation=flash"], r"model.attn_implementation=sdpa or flex"),
    ([*GPT_BERT, "optim.loss_normalization=micro_batch"], r"optim.loss_normalization=tokens"),
    ([*GPT_BERT, "pair=true"], r"set pair=false"),
    (["phases.pretrain.objective_mix={mlm: 1, clm: 1}", "phases.pretrain.objective=mlm"], r"keep one"),
    (["objective=mlm", "export_as=decoder"], r"export_as=decoder but no objective of mlm:1 is a "
                                             r"decoder objective; choose export_as=encoder"),
    (["objective=mlm", "export_as=encoder", "pair=true"], r"export_as=encoder .* pair=true trains "
                                                          r"and exports both"),
], ids=["unknown", "zero-weight", "no-export_as", "export_as-no-member", "flash", "micro_batch", "pair",
        "both-set", "export_as-single-objective", "export_as-pair"])
def test_a_mix_that_cannot_train_is_refused_naming_the_fix(workspace, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(workspace, "bad", *overrides)


def test_a_mix_on_one_side_needs_no_export_as_and_the_phase_mix_wins(workspace):
    cfg = config(workspace, "ok", "phases.decay.objective_mix={mlm: 1, mntp: 1}", *GPT_BERT)
    assert cfg.phase_mix("decay").name == "mlm:1+mntp:1" and cfg.phase_mix("pretrain").name == "mlm:15+clm:1"
    assert not cfg.model_config("pretrain").causal  # export_as=encoder: the model is an encoder


def test_the_configured_weights_reach_the_step_and_the_rows_of_the_right_objective(workspace, tiny_tokenizer):
    from ettin.data.tokenizer import load_tokenizer
    from ettin.train.plan import step_settings

    cfg = config(workspace, "weights", *GPT_BERT, "objective_mix={mlm: 3, clm: 1}")
    mix = cfg.phase_mix("pretrain")
    settings = step_settings(cfg, "pretrain", fresh_optimizer=True)
    assert dict(zip([m.name for m in mix.members], settings.group_weights)) == {"mlm": 0.75, "clm": 0.25}
    collator = mix.collator(load_tokenizer(tiny_tokenizer), mask_rate=0.3, seed=1)
    causal = [collator.directions[collator.choice(i)] for i in range(20_000)]
    # p = 1/4 of 20,000 rows: one standard deviation is 0.0031 of the share; 5 of them 0.015.
    assert abs(np.mean(causal) - 0.25) < 0.015, np.mean(causal)


def test_dry_run_shows_the_mix_and_its_average_targets(workspace):
    from ettin.train_command import dry_run_report

    report = dry_run_report(config(workspace, "dry", *GPT_BERT, "phase_order=[pretrain]",
                                   "phases.pretrain.mask_rate=0.25"))
    line = next(l for l in report.splitlines() if l.startswith("phase pretrain"))
    # 15/16 of the rows mask 25 % of 128 tokens (32), 1/16 predict all 128: 38 targets per row.
    assert "objective mlm:15+clm:1 (mask rate 25% -> 25%, 38 targets per full row on average)" in line


# ---------------------------------------------------------------------------------------------------
# Training: a mixed phase end to end, resumed, exported

MIXED_PHASE = [*GPT_BERT, "objective_mix={mlm: 3, clm: 1}", "phase_order=[pretrain]",
               "phases.pretrain.tokens=30_000", "phases.pretrain.checkpoint_every_tokens=10_000",
               "phases.pretrain.val_every_tokens=15_000"]


def rows(run_dir: Path, column: str) -> list[tuple[float, str]]:
    with (run_dir / "logs" / "pretrain" / "metrics.csv").open() as f:
        return [(float(r["train/tokens"]), r[column]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.fixture(scope="module")
def mixed_run(workspace):
    from ettin.train.run import train

    cfg = config(workspace, "mixed", *MIXED_PHASE, "export_at_end=true")
    train(cfg)
    return cfg


def test_a_mixed_phase_logs_each_objective_and_exports_the_chosen_class(mixed_run):
    from transformers import AutoModelForMaskedLM

    with (mixed_run.run_dir / "logs" / "pretrain" / "metrics.csv").open() as f:
        logged = list(csv.DictReader(f))
    header = set(logged[0])
    assert {"train/mlm/loss", "train/mlm/masked_accuracy", "train/clm/loss", "train/clm/perplexity",
            "val/mlm/loss", "val/clm/loss", "val/loss"} <= header
    train_rows = [r for r in logged if r.get("train/loss")]
    assert all(r["train/mlm/loss"] for r in train_rows)
    assert any(r["train/clm/loss"] for r in train_rows)
    val = [r for r in logged if r.get("val/loss")][-1]
    assert float(val["val/loss"]) == pytest.approx(
        0.75 * float(val["val/mlm/loss"]) + 0.25 * float(val["val/clm/loss"]), rel=1e-6)
    hf_config = json.loads((mixed_run.run_dir / "hf" / "config.json").read_text())
    assert hf_config["ettin_objective"] == "mlm"  # export_as=encoder
    model = AutoModelForMaskedLM.from_pretrained(str(mixed_run.run_dir / "hf"))
    assert type(model).__name__ == "ModernBertForMaskedLM"


def test_resume_in_the_middle_of_a_mixed_phase_is_bit_identical(workspace, crash_at_tokens, mixed_run):
    from ettin.store.checkpoints import read_meta
    from ettin.train.checkpoint import Checkpointer
    from ettin.train.run import train

    crashing = config(workspace, "mixed-crash", *MIXED_PHASE)
    crash_at_tokens(crashing, 15_000)
    assert 0 < read_meta(Checkpointer(crashing.run_dir).latest())["tokens"] < 30_000
    train(crashing)
    for column in ("train/loss", "train/mlm/loss", "train/clm/loss", "train/clm/perplexity"):
        assert rows(crashing.run_dir, column) == rows(mixed_run.run_dir, column), column


def test_the_pair_report_shows_the_mix(tmp_path):
    import pandas as pd

    from ettin.report.pair_report import runs_table
    from ettin.report.runs import Run

    run = Run(tmp_path / "gpt-bert", config={"objective": "mlm", "objective_mix": {"mlm": 15, "clm": 1},
                                             "export_as": "decoder", "phases": {"pretrain": {}}},
              phases=["pretrain"], metrics=pd.DataFrame(), checkpoints=[], phase_tokens={"pretrain": 30_000})
    table = runs_table(run, run)
    assert table.loc[table[""] == "phases", "A"].item() == "pretrain (mlm:15+clm:1, 30,000 tokens)"
    assert run.kind == "decoder"
