"""What the model, the collator and the optimizer actually receive from a recipe, in a real run of
the three smoke phases: the LR at every step against the schedule written out here, the masked
fraction of training and validation batches, each phase's RoPE thetas and sequence length."""

from __future__ import annotations

import csv
import math
from collections import defaultdict

import pytest
import torch

from ettin.data.tokenizer import load_tokenizer, special_ids
from ettin.model.modernbert import ModernBert
from ettin.optim.stable_adamw import StableAdamW
from ettin.train.config import compose
from ettin.train.run import train

PHASES = {"pretrain": 30_000, "extension": 15_000, "decay": 10_000}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One MLM run through the three phases with the model's inputs and the optimizer's LR recorded."""
    root = tmp_path_factory.mktemp("wiring")
    cfg = compose("smoke", [
        f"output_dir={root / 'runs'}", f"data_dir={root / 'data'}", "run_name=wired", "pair=false",
        "objective=mlm", "eval_at_end=false", "export_at_end=false", "trainer.num_workers=0",
        "trainer.log_every_steps=1", *(f"phases.{p}.tokens={t}" for p, t in PHASES.items()),
        "phases.pretrain.val_every_tokens=10_000",
    ])
    models: list[tuple[ModernBert, object]] = []  # (model, its config) in the order they were built
    forwards = defaultdict(list)  # model index -> [(training, input_ids, labels, max_seqlen)]
    lrs: list[float] = []
    init, forward, step = ModernBert.__init__, ModernBert.forward, StableAdamW.step

    def spy_init(self, config, **kwargs):
        init(self, config, **kwargs)
        if self.decoder.weight.device.type != "meta":  # start-up checks count parameters on meta
            models.append((self, config))

    def spy_forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        index = next(i for i, (m, _) in enumerate(models) if m is self)
        forwards[index].append((self.training, input_ids.clone(),
                                None if labels is None else labels.clone(), kwargs.get("max_seqlen")))
        return forward(self, input_ids, attention_mask, labels, **kwargs)

    def spy_step(self, closure=None):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, closure)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModernBert, "__init__", spy_init)
        patch.setattr(ModernBert, "forward", spy_forward)
        patch.setattr(StableAdamW, "step", spy_step)
        train(cfg)
    return cfg, models, forwards, lrs


def rows(cfg, phase):
    with (cfg.run_dir / "logs" / phase / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def expected_lr(phase: str, tokens_before: float) -> float:
    """The Ettin schedule of the smoke phases, written out independently of ettin.optim.schedule."""
    peak = 1.5e-3  # the tiny row's lr
    if phase == "pretrain":  # linear warmup over 20k tokens from 1e-10, then flat
        return peak * (1e-10 + (1 - 1e-10) * min(1.0, tokens_before / 20_000))
    start, final = (peak, 0.5) if phase == "extension" else (0.5 * peak, 0.04)
    progress = min(1.0, tokens_before / PHASES[phase])
    return start * (final + (1 - final) * (1 - math.sqrt(progress)))


@pytest.mark.slow
def test_the_lr_logged_and_given_to_the_optimizer_follows_the_schedule_at_every_step(recorded):
    cfg, _, _, optimizer_lrs = recorded
    logged = []
    for phase in PHASES:
        train_rows = [r for r in rows(cfg, phase) if r["train/lr"]]
        assert [int(r["step"]) for r in train_rows] == list(range(1, len(train_rows) + 1))
        before = [0.0] + [float(r["train/tokens"]) for r in train_rows[:-1]]
        for row, tokens in zip(train_rows, before):
            assert float(row["train/lr"]) == pytest.approx(expected_lr(phase, tokens), rel=1e-9), \
                (phase, tokens)
        logged += [float(r["train/lr"]) for r in train_rows]
    assert optimizer_lrs == pytest.approx(logged, rel=1e-12)


@pytest.mark.slow
def test_training_batches_are_masked_at_the_phase_rate_and_validation_at_the_eval_rate(recorded):
    cfg, _, forwards, _ = recorded
    ids = special_ids(load_tokenizer(str(cfg.run_dir / "tokenizer")))
    unmaskable = torch.tensor([ids.cls, ids.sep, ids.pad])

    def masked_fraction(calls):
        targets = sum(int((labels != -100).sum()) for _, _, labels, _ in calls)
        maskable = sum(int((~torch.isin(input_ids, unmaskable)).sum()) for _, input_ids, _, _ in calls)
        return targets / maskable

    for index, phase in enumerate(PHASES):
        training = [c for c in forwards[index] if c[0]]
        validation = [c for c in forwards[index] if not c[0]]
        assert training and validation
        assert masked_fraction(training) == pytest.approx(cfg.phases[phase].mask_rate, abs=0.02), phase
        assert masked_fraction(validation) == pytest.approx(cfg.trainer.val_mask_rate, abs=0.02), phase
    assert cfg.phases["pretrain"].mask_rate == 0.30 and cfg.trainer.val_mask_rate == 0.15


@pytest.mark.slow
def test_each_phase_builds_its_model_with_its_thetas_and_feeds_it_its_sequence_length(recorded):
    cfg, models, forwards, _ = recorded
    assert len(models) == len(PHASES)
    expected = {"pretrain": (10_000, 10_000, 128), "extension": (160_000, 160_000, 256),
                "decay": (160_000, 160_000, 256)}
    for index, phase in enumerate(PHASES):
        config = models[index][1]
        longest = max(max_seqlen for training, _, _, max_seqlen in forwards[index] if training)
        assert (config.global_rope_theta, config.local_rope_theta, longest) == expected[phase], phase
        assert cfg.phases[phase].seq_len == expected[phase][2]


@pytest.mark.slow
def test_validation_is_a_curve_in_metrics_csv(recorded):
    cfg, _, _, _ = recorded
    pretrain = rows(cfg, "pretrain")
    val = [r for r in pretrain if r["val/loss"]]
    assert [int(float(r["val/tokens"])) // 10_000 for r in val] == [1, 2, 3]  # every 10k + phase end
    assert all(not r["train/loss"] for r in val)  # a validation row repeats no train values
    last = pretrain[-1]
    assert last["val/loss"] and float(last["val/tokens"]) >= PHASES["pretrain"]


@pytest.mark.slow
def test_the_chunked_loss_trains_like_the_plain_one(tmp_path):
    """trainer.loss_implementation=chunked (never [targets x vocab] logits in memory) reaches the
    model and gives the plain loss's training run, to float rounding."""
    def run(loss: str) -> list[float]:
        cfg = compose("smoke", [
            f"output_dir={tmp_path / 'runs'}", f"data_dir={tmp_path / 'data'}", f"run_name={loss}",
            "pair=false", "objective=clm", "phase_order=[pretrain]", "phases.pretrain.tokens=8_000",
            "phases.pretrain.warmup_tokens=2_000", "trainer.num_workers=0", "trainer.log_every_steps=1",
            "eval_at_end=false", "export_at_end=false", f"trainer.loss_implementation={loss}",
            "model.attention_output_dropout=0.0",
        ])
        built = []
        init = ModernBert.__init__

        def spy_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if self.decoder.weight.device.type != "meta":  # start-up checks count parameters on meta
                built.append(self.loss_implementation)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ModernBert, "__init__", spy_init)
            train(cfg)
        assert built == [loss]
        return [float(r["train/loss"]) for r in rows(cfg, "pretrain") if r["train/loss"]]

    plain, chunked = run("plain"), run("chunked")
    assert len(plain) >= 4 and chunked == pytest.approx(plain, rel=1e-4)
