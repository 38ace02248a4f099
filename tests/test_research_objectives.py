"""Objectives as research variables, end to end on CPU: an objective per phase (CLM -> MLM), a
mask-rate schedule, and merging checkpoints (python -m ettin.merge). Each test checks against an
independent reference: transformers' own classes, the configured rates, numpy."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from ettin.store.checkpoints import list_checkpoints, load_weights, read_meta
from ettin.train.checkpoint import Checkpointer
from ettin.train_command import dry_run_report
from ettin.train.config import compose
from ettin.train.merge import MergeError, merge
from ettin.train.run import train

SHORT = ["pair=false", "trainer.log_every_steps=1", "trainer.num_workers=0", "eval_at_end=false",
         "export_at_end=false"]
# One phase of 40k tokens whose mask rate rises from 10 % to 40 %.
ANNEALED = ["phase_order=[pretrain]", "objective=mlm", "phases.pretrain.tokens=40_000",
            "phases.pretrain.checkpoint_every_tokens=10_000", "phases.pretrain.mask_rate=0.1",
            "phases.pretrain.final_mask_rate=0.4"]
# Gisserot-Boukhlef et al. 2025 in miniature: CLM, then MLM with fresh Adam moments.
BIPHASIC = ["phase_order=[pretrain,decay]", "objective=mlm", "phases.pretrain.objective=clm",
            "phases.pretrain.tokens=30_000", "phases.decay.tokens=10_000",
            "phases.decay.reset_optimizer=true", "export_at_end=true"]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("research")


def config(workspace: Path, name: str, *extra: str):
    return compose("smoke", [f"output_dir={workspace / 'runs'}", f"data_dir={workspace / 'data'}",
                             f"run_name={name}", *SHORT, *extra])


def rows(run_dir: Path, phase: str, column: str) -> list[tuple[float, float]]:
    """(train/tokens, column) of every logged training step of ``phase``."""
    with (run_dir / "logs" / phase / "metrics.csv").open() as f:
        return [(float(r["train/tokens"]), float(r[column])) for r in csv.DictReader(f)
                if r.get("train/loss")]


@pytest.fixture(scope="session")
def annealed_run(workspace):
    cfg = config(workspace, "annealed", *ANNEALED)
    train(cfg)
    return cfg


@pytest.fixture(scope="session")
def biphasic_run(workspace):
    cfg = config(workspace, "biphasic", *BIPHASIC)
    train(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------
# An objective per phase


def test_clm_then_mlm_exports_a_bidirectional_masked_lm_with_our_logits(biphasic_run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from ettin.model.export import load_checkpoint_model

    cfg = biphasic_run
    ends = {read_meta(c)["phase"]: read_meta(c) for c in list_checkpoints(cfg.run_dir)
            if read_meta(c)["phase_end"]}
    assert ends["pretrain"]["objective"] == "clm" and ends["pretrain"]["model_config"]["causal"]
    assert ends["decay"]["objective"] == "mlm" and not ends["decay"]["model_config"]["causal"]
    assert ends["decay"]["fresh_optimizer"]  # reset_optimizer: the MLM phase began with fresh moments
    # Each phase's metrics are its own objective's.
    with (cfg.run_dir / "logs" / "pretrain" / "metrics.csv").open() as f:
        assert "val/perplexity" in next(csv.reader(f))
    with (cfg.run_dir / "logs" / "decay" / "metrics.csv").open() as f:
        assert "train/mask_rate" in next(csv.reader(f))

    folder = cfg.run_dir / "hf"
    theirs = AutoModelForMaskedLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    assert type(theirs).__name__ == "ModernBertForMaskedLM"
    ours, _ = load_checkpoint_model(list_checkpoints(cfg.run_dir)[-1])
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(["The module trains an encoder and a decoder."], return_tensors="pt")["input_ids"]
    changed = ids.clone()
    changed[0, -2] = tokenizer.convert_tokens_to_ids(tokenizer.mask_token)
    with torch.no_grad():
        logits = theirs(input_ids=ids).logits
        torch.testing.assert_close(logits, ours(ids).logits, atol=1e-4, rtol=1e-4)
        # Bidirectional: a token near the end changes the first position's output.
        assert not torch.allclose(theirs(input_ids=changed).logits[0, 0], logits[0, 0])


def test_an_unknown_phase_objective_is_refused_with_the_choices(workspace):
    from ettin.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"phases.pretrain.objective='nope'.*mlm, clm, mntp"):
        config(workspace, "bad", "phases.pretrain.objective=nope")


# ---------------------------------------------------------------------------------------------------
# Mask-rate schedule

# A logged step holds ~1,600 maskable tokens: the realised rate's binomial standard deviation is at
# most 0.013, and the last step starts at most one step (~5 % of the phase, 0.015 of rate) before
# the end. 0.05 is more than 3 standard deviations beyond that.
RATE_TOLERANCE = 0.05


def test_the_logged_mask_rate_follows_the_schedule_from_start_to_end(annealed_run):
    logged = rows(annealed_run.run_dir, "pretrain", "train/mask_rate")
    assert abs(logged[0][1] - 0.1) < RATE_TOLERANCE, logged[0]
    assert abs(logged[-1][1] - 0.4) < RATE_TOLERANCE, logged[-1]
    middle = [rate for tokens, rate in logged if 15_000 < tokens < 25_000]
    assert middle and abs(np.mean(middle) - 0.25) < RATE_TOLERANCE, middle


def test_dry_run_estimates_follow_the_schedule(workspace):
    fixed = dry_run_report(config(workspace, "dry", *ANNEALED[:-2], "phases.pretrain.mask_rate=0.25"))
    annealed = dry_run_report(config(workspace, "dry", *ANNEALED))
    assert "mask rate 10% -> 40%, 32 targets per full row on average" in annealed  # 0.25 x 128
    # The schedule's mean rate is the fixed 25 %'s: the same targets and FLOPs.
    line = lambda report: next(l for l in report.splitlines() if l.startswith("phase pretrain"))
    assert line(annealed).split("),", 1)[1] == line(fixed).split("),", 1)[1]


def test_resume_inside_an_annealed_phase_is_bit_identical(workspace, crash_at_tokens, annealed_run):
    crashing = config(workspace, "annealed-crash", *ANNEALED)
    crash_at_tokens(crashing, 25_000)
    assert 0 < read_meta(Checkpointer(crashing.run_dir).latest())["tokens"] < 40_000
    train(crashing)  # resume=auto, in the middle of the schedule
    for column in ("train/loss", "train/mask_rate"):
        assert rows(crashing.run_dir, "pretrain", column) == rows(annealed_run.run_dir, "pretrain", column)


# ---------------------------------------------------------------------------------------------------
# Merging


def test_merged_weights_are_the_weighted_mean_and_the_merge_exports_and_trains(workspace, annealed_run):
    sources = [c for c in list_checkpoints(annealed_run.run_dir) if read_meta(c)["tokens"] < 30_000][:2]
    out = workspace / "runs" / "merged"
    checkpoint = merge(sources, out, [1.0, 3.0])

    merged = load_weights(checkpoint)
    a, b = (load_weights(s) for s in sources)
    for key in merged:
        expected = 0.25 * a[key].numpy().astype(np.float64) + 0.75 * b[key].numpy().astype(np.float64)
        np.testing.assert_allclose(merged[key].numpy(), expected, rtol=1e-6, atol=1e-7)
    meta = read_meta(checkpoint)
    assert [m["weight"] for m in meta["merged_from"]] == [0.25, 0.75]
    assert [Path(m["path"]) for m in meta["merged_from"]] == [s.resolve() for s in sources]
    assert (out / "hf" / "config.json").is_file()  # exported through the parity gate

    # It resumes like any checkpoint: the same run folder continues the phase to its end.
    cfg = config(workspace, "merged", *ANNEALED)
    train(cfg)
    assert read_meta(Checkpointer(cfg.run_dir).latest())["tokens"] >= 40_000


def saved_copy(source: Path, folder: Path, *, weights: dict | None = None, **meta_changes) -> Path:
    """A checkpoint of ``source``'s run state saved in ``folder`` with other weights or meta."""
    loaded = Checkpointer(source.parent.parent).load(source)
    meta = {k: v for k, v in loaded.meta.items()
            if k not in ("phase", "phase_index", "kind", "phase_end", "step", "tokens", "loader_state", "sha256")}
    return Checkpointer(folder).save(
        phase="pretrain", phase_index=0, kind="interval", loader_state=loaded.meta["loader_state"],
        model_state=weights or dict(loaded.model_state), optimizer_state=loaded.optimizer_state,
        rng_states=loaded.rng_states, config_yaml=(source / "config.yaml").read_text(),
        meta={**meta, **meta_changes})


def test_merging_different_vocabularies_is_refused_naming_both(workspace, annealed_run, tmp_path):
    source = list_checkpoints(annealed_run.run_dir)[0]
    weights = dict(Checkpointer(annealed_run.run_dir).load(source).model_state)
    key = "model.embeddings.tok_embeddings.weight"
    weights[key] = weights[key][:-64].clone()
    weights["decoder.bias"] = weights["decoder.bias"][:-64].clone()
    other = saved_copy(source, tmp_path / "other", weights=weights)
    with pytest.raises(MergeError, match="different vocabularies") as error:
        merge([source, other], tmp_path / "out", export=False)
    assert str(source) in str(error.value) and str(other) in str(error.value)


def test_merging_checkpoints_of_different_tokenizers_of_one_size_is_refused(annealed_run, tmp_path):
    import json
    import shutil

    source = list_checkpoints(annealed_run.run_dir)[0]
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(read_meta(source)["tokenizer"], tokenizer)
    backend = json.loads((tokenizer / "tokenizer.json").read_text())
    vocab = backend["model"]["vocab"]  # two ordinary tokens swap ids: the same size, other ids
    (a, ia), (b, ib) = sorted(vocab.items(), key=lambda item: item[1])[300:302]
    vocab[a], vocab[b] = ib, ia
    (tokenizer / "tokenizer.json").write_text(json.dumps(backend))
    other = saved_copy(source, tmp_path / "other", tokenizer=str(tokenizer))
    with pytest.raises(MergeError, match="different tokenizers"):
        merge([source, other], tmp_path / "out", export=False)


def test_merging_different_objectives_is_refused_unless_asked_and_then_said(annealed_run, tmp_path,
                                                                            capsys):
    from ettin.train.merge import main

    source = list_checkpoints(annealed_run.run_dir)[0]
    other = saved_copy(source, tmp_path / "other", objective="clm")
    with pytest.raises(MergeError, match="different objectives.*--mixed-objectives"):
        merge([source, other], tmp_path / "refused", export=False)
    assert main([str(source), str(other), "--out", str(tmp_path / "out"), "--mixed-objectives"]) == 0
    assert "merged different objectives (mlm, clm) as asked" in capsys.readouterr().out
    assert [m["objective"] for m in read_meta(list_checkpoints(tmp_path / "out")[0])["merged_from"]] \
        == ["mlm", "clm"]


@pytest.mark.parametrize("weights", ["nan,1", "inf,1", "-1,2", "0,0"])
def test_merge_weights_that_are_not_finite_or_sum_to_zero_are_refused_with_one_line(
        annealed_run, tmp_path, capsys, weights):
    from ettin.train.merge import main

    sources = [str(c) for c in list_checkpoints(annealed_run.run_dir)[:2]]
    assert main([*sources, "--out", str(tmp_path / "out"), f"--weights={weights}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --weights") and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_source_with_non_finite_weights_is_refused_naming_it(annealed_run, tmp_path, monkeypatch):
    import ettin.train.checkpoint as checkpoint

    source = list_checkpoints(annealed_run.run_dir)[0]
    weights = dict(Checkpointer(annealed_run.run_dir).load(source).model_state)
    weights["decoder.bias"] = weights["decoder.bias"].clone()
    weights["decoder.bias"][3] = float("nan")
    with monkeypatch.context() as older_version:  # today's save refuses NaN weights; an older one did not
        older_version.setattr(checkpoint, "check_finite_weights", lambda *args: None)
        other = saved_copy(source, tmp_path / "other", weights=weights)
    with pytest.raises(MergeError) as error:
        merge([source, other], tmp_path / "out", export=False)
    assert str(error.value).startswith(f"{other} holds non-finite weights (nan or inf in decoder.bias)")


def test_a_merge_whose_export_check_fails_publishes_nothing_and_the_retry_succeeds(
        annealed_run, tmp_path, monkeypatch):
    import ettin.train.merge as merging
    from ettin.model.export import ExportError

    sources = list_checkpoints(annealed_run.run_dir)[:2]
    real = merging.export_checkpoint

    def failing(*args, **kwargs):
        raise ExportError("the reloaded export differs")

    monkeypatch.setattr(merging, "export_checkpoint", failing)
    with pytest.raises(ExportError):
        merge(sources, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing published, not even the tokenizer copy
    monkeypatch.setattr(merging, "export_checkpoint", real)
    checkpoint = merge(sources, tmp_path / "out")
    assert list_checkpoints(tmp_path / "out") == [checkpoint]
    assert (tmp_path / "out" / "hf" / "config.json").is_file()


def test_the_pair_report_shows_each_phase_objective(tmp_path):
    import pandas as pd

    from ettin.report.pair_report import runs_table
    from ettin.report.runs import Run

    run = Run(tmp_path / "clm-mlm", config={"objective": "mlm", "phases": {"pretrain": {"objective": "clm"},
                                                                           "decay": {"objective": None}}},
              phases=["pretrain", "decay"], metrics=pd.DataFrame(), checkpoints=[],
              phase_tokens={"pretrain": 30_000, "decay": 10_000})
    table = runs_table(run, run)
    assert table.loc[table[""] == "phases", "A"].item() == "pretrain (clm, 30,000 tokens), decay (mlm, 10,000 tokens)"
    assert run.kind == "encoder"  # what its final model is
