"""python -m ettin.compare and ettin.report.runs on run directories written by hand (no training).

The reference for the sample order is the training loader itself (``StepBatches`` iterated the way
training iterates it, its micro-batches read back): the report's replay (``plan()`` and the keyed
permutation) must agree with it, and must catch a different seed or different data.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from data_fixtures import build_tiny_prepared, data_root, tiny_prepared, tiny_tokenizer  # noqa: F401
from ettin.report import identity, plots, runs, scores
from ettin.compare import main
from ettin.report.pair_report import CHECKPOINT_EVAL, default_out_dir, write_report
from ettin.data.loader import StepBatches, add_digests

BATCH = 4
STEPS = {"pretrain": 6, "decay": 3}


def loader_steps(prepared: Path, *, seed: int, phase: str, steps: int) -> list[dict]:
    """What training reads: the loader's step batches, micro-batches uncollated."""
    loader = StepBatches(str(prepared), seq_len=64, collator=lambda group: group,
                         global_batch_at=lambda tokens: BATCH, micro_batch_size=2, seed=seed,
                         phase=phase)
    return list(itertools.islice(iter(loader), steps))


def make_run(root: Path, name: str, prepared: Path, *, objective: str = "mlm", seed: int = 21,
             loader_seed: int | None = None, val_tokens: bool = False, bad_samples: bool = False,
             steps: dict = STEPS, digest_every: int = 0) -> Path:
    """A run directory as ettin.train.run writes it: config.yaml, metrics.csv per phase (a train row per
    step and a validation row at the end) and a phase-end checkpoint meta per phase; with
    ``digest_every``, interval checkpoint metas every so many steps too, and each meta's data digest
    as the loader observes it in training."""
    run = root / name
    phases = list(steps)
    config = {
        "recipe": "test", "run_name": name, "objective": objective, "seed": seed,
        "global_batch": BATCH, "optim": {"lr": 1e-3}, "phase_order": phases, "data_dir": str(root),
        "trainer": {"val_mask_rate": 0.15},
        "phases": {p: {"tokens": 10_000, "seq_len": 64, "micro_batch": 2, "lr_scale": 1.0,
                       "lr_schedule": "wsd", "global_rope_theta": 10_000.0,
                       "local_rope_theta": 10_000.0, "batch_warmup_tokens": 0,
                       "batch_warmup_min": 0} for p in phases},
        "data": {p: [{"path": str(prepared), "weight": 1.0}] for p in phases},
    }
    (run / "logs").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for index, phase in enumerate(phases):
        batches = loader_steps(prepared, seed=seed if loader_seed is None else loader_seed,
                               phase=phase, steps=steps[phase])
        (run / "logs" / phase).mkdir()
        with (run / "logs" / phase / "metrics.csv").open("w", newline="") as f:
            columns = ["step", "train/loss", "train/lr", "train/tokens", "train/global_batch",
                       "perf/tokens_per_s_per_device", "val/loss"] + (["val/tokens"] if val_tokens else [])
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            for step, batch in enumerate(batches):
                writer.writerow({"step": step, "train/loss": 5.0 - step / 10, "train/lr": 1e-3,
                                 "train/tokens": batch.state.tokens,
                                 "train/global_batch": batch.global_batch,
                                 "perf/tokens_per_s_per_device": 1000.0})
            last = batches[-1].state
            writer.writerow({"step": len(batches) - 1, "val/loss": 4.5,
                             **({"val/tokens": last.tokens} if val_tokens else {})})
        digest = add_digests()
        for number, batch in enumerate(batches, 1):
            digest = add_digests(digest, batch.rows_digest)
            end = number == len(batches)
            if not (end or digest_every and number % digest_every == 0):
                continue
            state = batch.state
            samples = state.samples + (1 if bad_samples and end else 0)
            checkpoint = run / "checkpoints" / f"{phase}-step{state.step:07d}-tok{state.tokens:015d}"
            checkpoint.mkdir(parents=True)
            (checkpoint / "meta.json").write_text(json.dumps({
                "run_name": name, "objective": objective, "phase": phase, "phase_index": index,
                "phase_end": end, "kind": "phase_end" if end else "interval", "step": state.step,
                "tokens": state.tokens,
                "loader_state": {"step": state.step, "samples": samples, "tokens": state.tokens,
                                 **({"data_digest": digest} if digest_every else {})},
                "model_config": {"hidden_size": 64, "num_hidden_layers": 2, "causal": objective == "clm"},
                "git_commit": "abc",
            }))
            (checkpoint / "COMPLETE").write_text("")
    return run


def statuses(checks, name: str) -> dict[str, str]:
    return {c.phase: c.status for c in checks if c.name == name}


def evaluation(names_kinds: dict, scores: dict, stderr: float = 0.01) -> dict:
    """An eval.json in the ettin-eval/1 schema; ``scores`` maps task -> (category, metric,
    higher_is_better, {name: score}); every score has the standard error ``stderr``."""
    return {"format": "ettin-eval/1", "suite": "offline", "created": "2026-01-01T00:00:00",
            "models": {name: {"path": f"/x/{name}", "kind": kind, "objective": None, "parameters": 1,
                              "tasks": {task: {"category": c, "metric": m, "score": s[name], "stderr": stderr,
                                               "higher_is_better": h, "smoke": True, "n_examples": 3,
                                               "library": "test"}
                                        for task, (c, m, h, s) in scores.items() if name in s}}
                       for name, kind in names_kinds.items()}}


@pytest.mark.slow
def test_a_pair_on_the_same_data_is_identical_everywhere(tmp_path, tiny_prepared):
    a = runs.load_run(make_run(tmp_path, "p-encoder", tiny_prepared))
    b = runs.load_run(make_run(tmp_path, "p-decoder", tiny_prepared, objective="clm"))
    checks = identity.identity_checks(a, b)
    assert {c.status for c in checks} == {"identical"}, identity.checks_table(checks).to_string()
    assert {c.name for c in checks} >= {"seed", "sequence length", "global batch", "token budget",
                                        "data sources (path, weight)", "prepared data fingerprint",
                                        "tokens seen", "sample order", "replay vs the run's own records"}
    order = [c for c in checks if c.name == "sample order" and c.phase == "pretrain"][0]
    assert "6 of 6 steps compared" in order.how


def test_the_replay_digests_exactly_the_token_ids_training_reads(tmp_path, tiny_prepared):
    run = runs.load_run(make_run(tmp_path, "r", tiny_prepared))
    replayed = identity.replay(run, "pretrain")
    for (batch, step_tokens, digest), step in zip(replayed.steps, loader_steps(
            tiny_prepared, seed=21, phase="pretrain", steps=6)):
        h = hashlib.blake2b(digest_size=12)
        rows = [tokens for micro in step.micro_batches for _, tokens in micro]
        for tokens in rows:
            h.update(np.asarray(tokens, dtype=np.int64).tobytes())
        assert (batch, step_tokens, digest) == (step.global_batch, step.step_tokens, h.hexdigest())
    assert len(replayed.steps) == 6


def test_another_seed_shows_as_a_different_seed_and_sample_order(tmp_path, tiny_prepared):
    a = runs.load_run(make_run(tmp_path, "a", tiny_prepared))
    b = runs.load_run(make_run(tmp_path, "b", tiny_prepared, seed=22))
    checks = identity.identity_checks(a, b)
    assert statuses(checks, "seed") == {"": "differs"}
    assert statuses(checks, "sample order") == {"pretrain": "differs", "decay": "differs"}
    # Each run's replay still reproduces what that run recorded.
    assert statuses(checks, "replay vs the run's own records") == {"pretrain": "identical",
                                                                   "decay": "identical"}
    row = identity.checks_table(checks).query("check == 'seed'").iloc[0]
    assert (row["A"], row["B"]) == ("21", "22")


def test_other_data_shows_as_a_different_fingerprint_and_order(tmp_path, data_root, tiny_prepared):
    other = build_tiny_prepared(data_root, "tiny-prepared-other-split", seed=5)
    a = runs.load_run(make_run(tmp_path, "a", tiny_prepared))
    b = runs.load_run(make_run(tmp_path, "b", other))
    checks = identity.identity_checks(a, b)
    assert statuses(checks, "data sources (path, weight)")["pretrain"] == "differs"
    assert statuses(checks, "prepared data fingerprint")["pretrain"] == "differs"
    assert statuses(checks, "sample order")["pretrain"] == "differs"


def test_the_suite_compares_each_sizes_data_with_the_first_sizes(tmp_path, data_root, tiny_prepared):
    from ettin.report.suite_report import ACROSS_SIZES, identity_table

    other = build_tiny_prepared(data_root, "tiny-prepared-other-split", seed=5)
    for name, prepared in (("encoder_tiny", tiny_prepared), ("decoder_tiny", tiny_prepared),
                           ("encoder_micro", tiny_prepared), ("encoder_17m", other)):
        make_run(tmp_path, name, prepared, objective="clm" if name.startswith("decoder") else "mlm")
    members = [{"name": n, "size": n.split("_")[1]} for n in
               ("encoder_tiny", "decoder_tiny", "encoder_micro", "encoder_17m")]
    table = identity_table(tmp_path, members)
    across = table[table["size"] == "across sizes"]
    assert set(across["check"]) == set(ACROSS_SIZES)
    status = {(m, c): s for m, c, s in zip(across["members"], across["check"], across["status"])}
    assert {c: status[("encoder_tiny vs encoder_micro", c)] for c in ACROSS_SIZES} == dict.fromkeys(
        ACROSS_SIZES, identity.IDENTICAL)
    assert {c: status[("encoder_tiny vs encoder_17m", c)] for c in ACROSS_SIZES} == dict.fromkeys(
        ACROSS_SIZES, identity.DIFFERS)
    assert set(table[table["size"] == "tiny"]["members"]) == {"encoder_tiny vs decoder_tiny"}


def test_a_run_whose_records_disagree_with_the_replay_is_caught(tmp_path, tiny_prepared):
    # Trained on seed 7 but config.yaml says 21: the replay (seed 21) misses its logged token clock.
    a = runs.load_run(make_run(tmp_path, "a", tiny_prepared))
    b = runs.load_run(make_run(tmp_path, "b", tiny_prepared, loader_seed=7))
    assert statuses(identity.identity_checks(a, b), "replay vs the run's own records")["pretrain"] == "differs"
    c = runs.load_run(make_run(tmp_path, "c", tiny_prepared, bad_samples=True))
    checks = identity.identity_checks(a, c)
    assert statuses(checks, "replay vs the run's own records")["pretrain"] == "differs"
    assert statuses(checks, "tokens seen")["pretrain"] == "differs"


def test_a_bounded_replay_says_how_much_it_compared(tmp_path, tiny_prepared):
    a = runs.load_run(make_run(tmp_path, "a", tiny_prepared))
    b = runs.load_run(make_run(tmp_path, "b", tiny_prepared))
    checks = identity.order_checks(a, b, "pretrain", max_steps=2, spread_positions=5)
    assert checks[0].status == "identical"
    assert "2 of 6 steps compared" in checks[0].how and "5 sample positions" in checks[0].how
    assert "first 2 of 6 steps replayed" in checks[1].a
    # A sample budget bounds the replay too: steps are replayed until it is reached.
    bounded = identity.replay(a, "pretrain", max_samples=BATCH + 1, spread_positions=3)
    assert len(bounded.steps) == 2 and len(bounded.spread) == 3


def test_missing_data_is_not_recorded_rather_than_identical(tmp_path, tiny_prepared):
    a = runs.load_run(make_run(tmp_path, "a", tiny_prepared))
    b = runs.load_run(make_run(tmp_path, "b", tiny_prepared))
    config = yaml.safe_load((b.path / "config.yaml").read_text())
    config["data"]["decay"] = [{"path": str(tmp_path / "gone"), "weight": 1.0}]
    (b.path / "config.yaml").write_text(yaml.safe_dump(config))
    checks = identity.identity_checks(a, runs.load_run(b.path))
    assert statuses(checks, "prepared data fingerprint")["decay"] == "not recorded"
    assert statuses(checks, "sample order")["decay"] == "not recorded"


def test_recorded_data_in_the_checkpoint_meta_is_preferred(tmp_path, tiny_prepared):
    a = runs.load_run(make_run(tmp_path, "a", tiny_prepared))
    for checkpoint in a.checkpoints:
        checkpoint.meta["data"] = {"seed": 99, "seq_len": 64, "global_batch": BATCH, "sources": [
            {"path": str(tiny_prepared), "weight": 1.0, "fingerprint": "recorded-fp"}]}
    sources = runs.data_sources(a, "pretrain")
    assert sources == [{"path": str(tiny_prepared), "weight": 1.0, "format": "prepared",
                        "fingerprint": "recorded-fp", "recorded": True}]
    assert runs.recorded_seed(a) == 99


def test_metrics_lie_on_one_cumulative_token_axis(tmp_path, tiny_prepared):
    run = runs.load_run(make_run(tmp_path, "a", tiny_prepared))
    first = loader_steps(tiny_prepared, seed=21, phase="pretrain", steps=6)
    second = loader_steps(tiny_prepared, seed=21, phase="decay", steps=3)
    end_of_first = first[-1].state.tokens
    assert run.offsets == {"pretrain": 0, "decay": end_of_first}
    decay = run.curve("train/loss")[lambda d: d["phase"] == "decay"]
    assert list(decay["total_tokens"]) == [end_of_first + s.state.tokens for s in second]
    # The validation row has no val/tokens: its step's train row gives them.
    val = run.curve("val/loss")
    assert list(val["total_tokens"]) == [end_of_first, end_of_first + second[-1].state.tokens]


def test_validation_tokens_are_read_when_logged_and_stale_rows_are_dropped(tmp_path, tiny_prepared):
    path = make_run(tmp_path, "a", tiny_prepared, val_tokens=True)
    csv_file = path / "logs" / "decay" / "metrics.csv"
    rows = list(csv.DictReader(csv_file.open()))
    stale = {**rows[-2], "step": "9"}  # the last train values again at a later step
    with csv_file.open("a", newline="") as f:
        csv.DictWriter(f, rows[0].keys()).writerow(stale)
    run = runs.load_run(path)
    decay = run.curve("train/loss")[lambda d: d["phase"] == "decay"]
    assert len(decay) == 3
    assert run.curve("val/loss")["total_tokens"].iloc[-1] == run.offsets["decay"] + int(rows[-1]["val/tokens"])


def test_scores_name_the_winner_by_the_metric_direction_and_the_paper(tmp_path):
    ev = evaluation({"enc": "encoder", "dec": "decoder"}, {
        "nli": ("classification", "accuracy", True, {"enc": 0.6, "dec": 0.5}),
        "ret": ("retrieval", "ndcg@10", True, {"enc": 0.2, "dec": 0.3}),
        "lm": ("generation", "loss", False, {"enc": 2.0, "dec": 1.5}),
        "same": ("generation", "acc", True, {"enc": 0.4, "dec": 0.4}),
        "ppl": ("language_modeling", "pseudo_perplexity", False, {"enc": 9.0}),
    })
    ev["models"]["dec"]["tasks"]["ppl"] = {**ev["models"]["enc"]["tasks"]["ppl"], "metric": "perplexity"}
    table = scores.score_table(ev, "enc", "dec").set_index("task")
    assert dict(table["winner"]) == {"nli": "enc", "ret": "dec", "lm": "dec", "same": "within noise",
                                     "ppl": "not comparable (pseudo_perplexity vs perplexity)"}
    assert dict(table["agrees"]) == {"nli": "yes", "ret": "no", "lm": "yes", "same": "-", "ppl": "-"}
    assert table.loc["ppl", "metric"] == "pseudo_perplexity/perplexity"  # each model's metric named
    assert scores.is_smoke(ev)
    # Two encoders: an A/B comparison, the paper's direction is not tested.
    ab = evaluation({"x": "encoder", "y": "encoder"},
                    {"nli": ("classification", "accuracy", True, {"x": 0.1, "y": 0.2})})
    row = scores.score_table(ab, "x", "y").iloc[0]
    assert (row["winner"], row["agrees"]) == ("y", "-") and "not tested" in row["paper"]
    # A prefix LM is neither side of the paper's finding: its wins test nothing.
    prefix = evaluation({"x": "encoder", "p": "prefix"},
                        {"nli": ("classification", "accuracy", True, {"x": 0.1, "p": 0.2})})
    row = scores.score_table(prefix, "x", "p").iloc[0]
    assert (row["winner"], row["agrees"]) == ("p", "-")
    assert row["paper"] == "encoders (not tested: encoder vs prefix)"
    with pytest.raises(runs.RunError, match="no results for z"):
        scores.score_table(ab, "x", "z")


def test_write_report_writes_markdown_html_and_plots(tmp_path, tiny_prepared):
    a = make_run(tmp_path, "p-encoder", tiny_prepared)
    b = make_run(tmp_path, "p-decoder", tiny_prepared, objective="clm")
    ev = evaluation({"p-encoder": "encoder", "p-decoder": "decoder"},
                    {"nli": ("classification", "accuracy", True, {"p-encoder": 0.7, "p-decoder": 0.6})})
    (a / "eval.json").write_text(json.dumps(ev))  # found without --eval
    out = default_out_dir(a, b)
    assert out == tmp_path / "p-report"
    report = write_report(a, b, out)
    assert report == out / "report.md"
    text = report.read_text()
    assert "smoke tasks" in text and "| nli | classification | accuracy | higher | 0.7 ± 0.01 ★ | 0.6 ± 0.01 |" in text
    assert "encoder/decoder pair" in text and "checks identical" in text
    for png in ("loss.png", "schedule.png", "throughput.png", "scores.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in text
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "src='loss.png'" not in page
    assert "Scores over training" not in text and not list(out.glob("scores-over-tokens-*"))  # no checkpoint scored


def test_checkpoint_scores_are_drawn_per_task_on_the_token_axis_of_the_losses(tmp_path, tiny_prepared):
    """What python -m ettin.eval RUN_A RUN_B --checkpoints all --out DIR/checkpoint-eval writes (a model
    RUN@CHECKPOINT per checkpoint) is found, and each task's figure plots exactly those scores at the
    checkpoints' cumulative token counts (the phases' tokens read from the checkpoint metas)."""
    a = make_run(tmp_path, "p-encoder", tiny_prepared, digest_every=2)
    b = make_run(tmp_path, "p-decoder", tiny_prepared, objective="clm", digest_every=2)
    expected, names_kinds, nli, lm = {}, {}, {}, {}
    for offset_kind, run in ((0.0, a), (0.5, b)):
        metas = sorted((json.loads(m.read_text()) for m in (run / "checkpoints").glob("*/meta.json")),
                       key=lambda meta: (meta["phase_index"], meta["step"]))
        pretrain_tokens = max(m["tokens"] for m in metas if m["phase"] == "pretrain")
        for index, (folder, meta) in enumerate(sorted(
                ((f"{m['phase']}-step{m['step']:07d}-tok{m['tokens']:015d}", m) for m in metas),
                key=lambda item: (item[1]["phase_index"], item[1]["step"]))):
            name = f"{run.name}@{folder}"
            names_kinds[name] = "encoder" if run == a else "decoder"
            nli[name], lm[name] = 0.1 * index + offset_kind, 9.0 - index
            tokens = meta["tokens"] + (pretrain_tokens if meta["phase"] == "decay" else 0)
            expected.setdefault(run.name, []).append((tokens, nli[name]))
    assert [len(points) for points in expected.values()] == [5, 5]  # steps 2, 4, 6 of pretrain; 2, 3 of decay
    names_kinds[f"{a.name}@pretrain-step0000099"] = "encoder"  # a checkpoint the run no longer has: left out
    nli[f"{a.name}@pretrain-step0000099"] = 1.0
    evaluated = evaluation(names_kinds, {"nli": ("classification", "accuracy", True, nli),
                                         "smoke_lm": ("language_modeling", "word_perplexity", False, lm)})
    out = default_out_dir(a, b)
    (out / CHECKPOINT_EVAL).mkdir(parents=True)
    (out / CHECKPOINT_EVAL / "eval.json").write_text(json.dumps(evaluated))
    text = write_report(a, b, out).read_text()
    assert "## Scores over training" in text and "Only checkpoints were evaluated" in text
    for task in ("nli", "smoke_lm"):
        assert f"(scores-over-tokens-{task}.png)" in text
        assert (out / f"scores-over-tokens-{task}.png").read_bytes()[:4] == b"\x89PNG"
    pair = [runs.load_run(a), runs.load_run(b)]
    table = scores.checkpoint_scores(scores.load_evaluation(out / CHECKPOINT_EVAL / "eval.json"), pair)
    axis = plots.plot_scores_over_tokens(table, "nli", pair).axes[0]
    plotted = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in axis.get_lines()
               if not line.get_label().startswith("_")}  # the phase boundaries are unlabelled lines
    assert plotted == {run.label: expected[run.name] for run in pair}
    assert axis.get_xlabel() == "tokens (cumulative over phases)" and axis.get_ylabel() == "accuracy (higher is better)"


def test_two_runs_of_one_objective_are_an_ab_comparison(tmp_path, tiny_prepared):
    a = make_run(tmp_path, "lr1", tiny_prepared)
    b = make_run(tmp_path, "lr2", tiny_prepared)
    assert default_out_dir(a, b) == tmp_path / "lr1-vs-lr2"
    assert main([str(a), str(b)]) == 0
    text = (tmp_path / "lr1-vs-lr2" / "report.md").read_text()
    assert "A/B comparison of two encoders" in text and "No evaluation found" in text


def test_a_path_that_is_not_a_run_is_refused_by_name(tmp_path, tiny_prepared, capsys):
    a = make_run(tmp_path, "a", tiny_prepared)
    (tmp_path / "empty").mkdir()
    assert main([str(a), str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'empty'} is not an ettin run directory" in error and "config.yaml" in error
    assert main([str(tmp_path / "nowhere"), str(a)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main([str(a), str(a), "--out", str(tmp_path / "o"), "--eval", str(tmp_path / "bad.json")]) == 2
    assert "ettin-eval/1" in capsys.readouterr().err


def test_weight_norms_split_every_weight_into_one_group(tmp_path, tiny_prepared):
    import torch

    from ettin.store.checkpoints import save_weights
    from ettin.model.config import model_config
    from ettin.model.modernbert import ModernBert

    run_dir = make_run(tmp_path, "a", tiny_prepared)
    model = ModernBert(model_config("tiny"))
    with torch.no_grad():  # no zero-initialised tensor (biases) may hide from the count
        for parameter in model.parameters():
            parameter.normal_()
    for checkpoint in (run_dir / "checkpoints").iterdir():
        save_weights(model.state_dict(), checkpoint)
    norms = runs.weight_norms(runs.load_run(run_dir))
    assert len(norms) == len(STEPS)
    row = norms.iloc[0]
    groups = list(runs.WEIGHT_GROUPS)
    # Every parameter once (the tied projection is the embedding matrix): the groups' norms add up
    # in squares to the norm of all parameters.
    total = torch.sqrt(sum(p.double().pow(2).sum() for p in model.parameters()))
    assert float(np.sqrt(sum(row[g] ** 2 for g in groups))) == pytest.approx(float(total), rel=1e-9)
    assert all(row[g] > 0 for g in groups)


def test_runs_with_observed_digests_compare_them_and_name_the_first_differing_interval(
        tmp_path, data_root, tiny_prepared):
    a = runs.load_run(make_run(tmp_path, "a", tiny_prepared, digest_every=2))
    b = runs.load_run(make_run(tmp_path, "b", tiny_prepared, objective="clm", digest_every=2))
    check = next(c for c in identity.identity_checks(a, b) if c.name == "sample order")
    assert check.status == "identical" and "observed by the loaders" in check.how
    assert "replay" not in check.how
    other = build_tiny_prepared(data_root, "tiny-prepared-other-split", seed=5)
    c = runs.load_run(make_run(tmp_path, "c", other, digest_every=2))
    check = next(c for c in identity.identity_checks(a, c) if c.name == "sample order")
    assert check.status == "differs" and check.a.startswith("first differing interval: steps 0-2 ")


def test_a_run_without_observed_digests_falls_back_to_the_replay_and_says_so(tmp_path, tiny_prepared):
    a = runs.load_run(make_run(tmp_path, "a", tiny_prepared, digest_every=2))
    old = runs.load_run(make_run(tmp_path, "old", tiny_prepared))
    check = next(c for c in identity.identity_checks(a, old) if c.name == "sample order")
    assert check.status == "identical" and "replayed because no data digest observed" in check.how


def test_the_pair_report_shows_an_error_on_every_score_and_no_star_inside_the_noise(tmp_path, tiny_prepared):
    """The default pair's case: smoke_nli 0.383 vs 0.367 on 300 examples is inside the noise (no star, no
    'agrees'); a cloze difference of 80 examples in 400 is a decided decoder win."""
    from test_uncertainty import examples, write_evaluation

    a = make_run(tmp_path, "p-encoder", tiny_prepared)
    b = make_run(tmp_path, "p-decoder", tiny_prepared, objective="clm")
    nli_dec, cloze_enc = np.zeros(300), np.zeros(400)
    nli_dec[:110], cloze_enc[:229] = 1.0, 1.0
    nli_enc, cloze_dec = nli_dec.copy(), cloze_enc.copy()
    nli_enc[110:130], nli_enc[:15], cloze_dec[229:309] = 1.0, 0.0, 1.0
    out = default_out_dir(a, b)
    out.mkdir()
    write_evaluation(out, {"p-encoder": {"smoke_cloze": ("generation", examples(value=cloze_enc)),
                                         "smoke_nli": ("classification", examples(value=nli_enc))},
                           "p-decoder": {"smoke_cloze": ("generation", examples(value=cloze_dec)),
                                         "smoke_nli": ("classification", examples(value=nli_dec))}})
    text = write_report(a, b, out).read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| smoke_")}
    assert "| 0.5725 ± 0.025 | 0.7725 ± 0.021 ★ |" in rows["smoke_cloze"] and "| yes |" in rows["smoke_cloze"]
    assert "| 0.3833 ± 0.028 | 0.3667 ± 0.028 |" in rows["smoke_nli"] and "★" not in rows["smoke_nli"]
    assert "| within noise |" in rows["smoke_nli"] and rows["smoke_nli"].endswith("| - |")
    assert "McNemar exact" in rows["smoke_nli"] and "smoke tasks" in text


class Named:
    def __init__(self, name: str):
        self.name = name


def test_checkpoint_noise_is_the_spread_of_the_last_checkpoints_beside_the_difference():
    """On 'noisy' run A moves by 0.1 between its last three checkpoints and B is flat: a signal of 0.15 is
    inside 2 x the noise (0.1); on 'clear' A is 0.5 ahead and barely moves: it separates."""
    rows = []
    for run, offset in (("A", 0.0), ("B", -0.05)):
        for step, wobble in enumerate((0.0, 0.9, 0.1, 0.0, 0.2)):  # only the last 3 count
            noisy = (wobble if run == "A" else 0.0) + offset
            rows.append([run, f"c{step}", step, "noisy", "generation", "acc", True, 0.5 + noisy, None, "decay"])
            rows.append([run, f"c{step}", step, "clear", "generation", "acc", True,
                         (0.9 if run == "A" else 0.4) + wobble / 100, None, "decay"])
    table = pd.DataFrame(rows, columns=scores.CHECKPOINT_COLUMNS)
    noise = scores.checkpoint_noise(table, [Named("A"), Named("B")]).set_index("task")
    assert noise.loc["noisy", "noise A"] == pytest.approx(np.std([0.1, 0.0, 0.2], ddof=1))
    assert noise.loc["noisy", "noise B"] == 0.0 and noise.loc["noisy", "checkpoints"] == 3
    assert noise.loc["noisy", "signal"] == pytest.approx(0.1 + 0.05)
    assert noise.loc["noisy", "separates"] == "no" and noise.loc["clear", "separates"] == "yes"


def test_scores_of_weights_that_are_not_the_runs_current_ones_are_left_out_loudly(tmp_path, tiny_prepared):
    """The issue's scenario: the decoder was deleted and trained again (same checkpoint names, other
    weights) while eval.json kept its old scores: the report shows which checkpoint and weights each
    run's scores came from, and leaves out the decoder's old score with a WARNING."""
    from ettin.store.checkpoints import latest_checkpoint

    a = make_run(tmp_path, "p-encoder", tiny_prepared)
    b = make_run(tmp_path, "p-decoder", tiny_prepared, objective="clm")
    for run, sha in ((a, "a" * 64), (b, "b" * 64)):  # the weights hash training records in each meta
        for meta_file in (run / "checkpoints").glob("*/meta.json"):
            meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()),
                                             "sha256": {"model.safetensors": sha}}))
    ev = evaluation({"p-encoder": "encoder", "p-decoder": "decoder"},
                    {"nli": ("classification", "accuracy", True, {"p-encoder": 0.7, "p-decoder": 0.6})})
    for run, scored_sha in ((a, "a" * 64), (b, "c" * 64)):  # the decoder's score: the old weights
        final = latest_checkpoint(run)
        ev["models"][run.name]["tasks"]["nli"]["provenance"] = {
            "weights_sha256": "e" * 64, "checkpoint": {"name": final.name, "tokens": 768,
                                                       "weights_sha256": scored_sha}}
    (a / "eval.json").write_text(json.dumps(ev))
    text = write_report(a, b, default_out_dir(a, b)).read_text()
    final = latest_checkpoint(b).name
    assert (f"WARNING: scores left out, not computed from the runs' current weights: p-decoder (nli) scored from "
            f"{final} (weights cccccccccccc), the run's is {final} (weights bbbbbbbbbbbb)") in text
    assert f"| p-encoder | {final} | 768 | eeeeeeeeeeee | current |" in text
    assert f"| p-decoder | {final} | 768 | eeeeeeeeeeee | STALE: scored from {final}" in text
    assert "| nli | classification | accuracy | higher | 0.7 ± 0.01 | n/a | - | - | - | not evaluated on both |" in text


def test_three_runs_side_by_side_each_pair_tested_and_each_run_checked_against_a(tmp_path, tiny_prepared):
    """An encoder, a decoder and a diffusion model on smoke_cloze (400 examples): the decoder gets 80 more
    right than the encoder and the diffusion model the encoder's exact answers, so A vs B and B vs C are
    decided (McNemar) and A vs C is within noise; one score table with three columns, three pairwise rows."""
    from test_uncertainty import examples, write_evaluation

    a = make_run(tmp_path, "p-encoder", tiny_prepared)
    b = make_run(tmp_path, "p-decoder", tiny_prepared, objective="clm")
    c = make_run(tmp_path, "p-diffusion", tiny_prepared, objective="mdlm")
    encoder, decoder = np.zeros(400), np.zeros(400)
    encoder[:229], decoder[:309] = 1.0, 1.0
    out = tmp_path / "p-encoder-vs-p-decoder-vs-p-diffusion"
    assert default_out_dir(a, b, c) == out
    out.mkdir()
    write_evaluation(out, {name: {"smoke_cloze": ("generation", examples(value=values))}
                           for name, values in (("p-encoder", encoder), ("p-decoder", decoder),
                                                ("p-diffusion", encoder))})
    assert main([str(a), str(b), str(c)]) == 0
    text = (out / "report.md").read_text()
    assert "# ettin report: p-encoder vs p-decoder vs p-diffusion" in text
    assert "C = p-diffusion (MDLM encoder) at" in text and "| run | p-encoder | p-decoder | p-diffusion |" in text
    for letter in "BC":
        assert f"## Data and schedule identity: A vs {letter}" in text
        assert f"| check | phase | status | A | {letter} | how |" in text
    assert "DIFFERS" not in text
    rows = [line for line in text.splitlines() if line.startswith("| smoke_cloze |")]
    assert rows[0] == "| smoke_cloze | generation | acc | higher | 0.5725 ± 0.025 | 0.7725 ± 0.021 | 0.5725 ± 0.025 |"
    pairs = {tuple(cell.strip() for cell in row.split("|")[3:5]): row for row in rows[1:]}
    assert list(pairs) == [("p-encoder", "p-decoder"), ("p-encoder", "p-diffusion"), ("p-decoder", "p-diffusion")]
    assert "| p-decoder |" in pairs["p-encoder", "p-decoder"].split("McNemar exact")[1]
    assert "| within noise |" in pairs["p-encoder", "p-diffusion"]
    assert "| p-decoder |" in pairs["p-decoder", "p-diffusion"].split("McNemar exact")[1]
    assert all("McNemar exact" in row for row in pairs.values())

    evaluated = scores.load_evaluation(out / "eval.json")
    names = ["p-encoder", "p-decoder", "p-diffusion"]
    (panel,) = [axis for axis in plots.plot_scores(scores.side_by_side(evaluated, names), names).axes
                if axis.get_visible()]
    assert [bar.get_height() for bar in panel.patches] == [0.5725, 0.7725, 0.5725]
    assert [t.get_text() for t in panel.get_xticklabels()] == names
    assert "(scores.png)" in text and "(loss.png)" in text
