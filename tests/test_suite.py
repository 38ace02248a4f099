"""python -m ettin.suite: the members of a ladder, the local run (skip finished members, resume the
rest), status, the suite report and its rebuild by python -m ettin.compare --suite, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from ettin.cluster.suite_members import SuiteError, plan
from ettin.store.members import member_name
from ettin.report.suite_report import COLUMNS, category_averages, cross_comparisons, paper_points, suite_table
from ettin.report.plots import plot_ladder
from ettin.compare import main as compare_main
from ettin.suite import main as suite_main, parse

# Short phases for every member (an override of a phase a member lacks is not applied to it).
SHORT = ["phases.pretrain.tokens=12_000", "phases.pretrain.warmup_tokens=2_000",
         "phases.pretrain.checkpoint_every_tokens=0", "phases.pretrain.val_every_tokens=0",
         "phases.extension.tokens=4_000", "phases.decay.tokens=4_000", "phases.cross.tokens=4_000",
         "phases.cross.warmup_tokens=1_000", "phases.cross.decay_tokens=2_000",
         "trainer.num_workers=0", "trainer.log_every_steps=2", "eval_limit=8"]


def run_suite(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = suite_main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_members_come_in_ladder_order_with_cross_members_after_their_base(tmp_path):
    suite = plan(tmp_path / "s", "smoke", cross=True, overrides=["phases.pretrain.tokens=30000"])
    assert [m.name for m in suite.members] == [
        "encoder_tiny", "decoder_tiny", "encoder_from_decoder_tiny", "decoder_from_encoder_tiny",
        "encoder_micro", "decoder_micro", "encoder_from_decoder_micro", "decoder_from_encoder_micro"]
    cross = suite.member("encoder_from_decoder_micro")
    cfg = cross.config()
    assert cfg.objective == "mntp" and cfg.init == str((tmp_path / "s" / "decoder_micro").resolve())
    assert cfg.phase_order == ["cross"] and cross.base == "decoder_micro" and cross.origin == "cross"
    assert "phases.pretrain.tokens=30000" not in cross.overrides  # it has no pretrain phase
    assert suite.member("encoder_tiny").config().phases["pretrain"].tokens == 30000
    ettin = plan(tmp_path / "e", "ettin")
    assert [m.name for m in ettin.members][:2] == ["encoder_17m", "decoder_17m"] and len(ettin.members) == 12


def test_mdlm_adds_a_diffusion_member_per_size_the_encoder_trained_with_objective_mdlm(tmp_path):
    from dataclasses import asdict

    three = ["mlm", "clm", "mdlm"]
    assert parse([]).objectives == ["mlm", "clm"] and parse(["objectives=[mlm,clm,mdlm]"]).objectives == three
    suite = plan(tmp_path / "s", "smoke", objectives=three, overrides=["phases.pretrain.tokens=30000"])
    assert [m.name for m in suite.members] == ["encoder_tiny", "decoder_tiny", "diffusion_tiny",
                                               "encoder_micro", "decoder_micro", "diffusion_micro"]
    ettin = plan(tmp_path / "e", "ettin", sizes=["17m"], objectives=three)
    assert ettin.member("diffusion_17m").recipe == "encoder_17m"
    for members, size in ((suite, "tiny"), (suite, "micro"), (ettin, "17m")):
        diffusion, encoder = (asdict(members.member(member_name(role, size)).config()) for role in ("diffusion", "encoder"))
        assert (diffusion["objective"], encoder["objective"]) == ("mdlm", "mlm")
        # Everything else is the encoder's: recipe, data, order (seed), schedule, shape.
        assert {key for key in encoder if diffusion[key] != encoder[key]} == {"run_name", "objective"}
    assert suite.member("diffusion_micro").origin == "native"  # trained from scratch: the native Slurm array
    assert [m.name for m in plan(tmp_path / "d", "smoke", sizes=["tiny"]).members] == ["encoder_tiny", "decoder_tiny"]


def test_unknown_objectives_and_cross_members_without_their_bases_are_refused(tmp_path):
    with pytest.raises(SuiteError, match=r"objectives=\[mlm,gpt\]: choose from mlm, clm, mdlm"):
        plan(tmp_path, "smoke", objectives=["mlm", "gpt"])
    with pytest.raises(SuiteError, match="keep mlm and clm in objectives"):
        plan(tmp_path, "smoke", cross=True, objectives=["mlm", "mdlm"])
    code, _, err = run_suite("recipe=smoke", "objectives=[mlm,clm,diffusion]", f"suite_dir={tmp_path}")
    assert code == 2 and "choose from mlm, clm, mdlm" in err
    code, out, _ = run_suite("--help")
    assert code == 0 and "objectives=[..]" in out and "mlm, clm, mdlm" in out


def test_a_size_joins_a_ladder_only_by_its_ladder_field(monkeypatch):
    """A new size without a published count (say 250m) is on no ladder until its row names one."""
    from dataclasses import replace

    from ettin.cluster.suite_members import family_sizes
    from ettin.model.config import SIZES

    monkeypatch.setitem(SIZES, "250m", replace(SIZES["150m"], parameters=None, ladder=None))
    assert family_sizes("smoke") == ["tiny", "micro"] and "250m" not in family_sizes("ettin")
    monkeypatch.setitem(SIZES, "250m", replace(SIZES["150m"], parameters=None, ladder="ettin"))
    assert family_sizes("ettin")[-1] == "250m"


def test_bad_input_names_the_problem_and_the_fix(tmp_path):
    with pytest.raises(SuiteError, match="choose from tiny, micro"):
        plan(tmp_path, "smoke", sizes=["huge"])
    with pytest.raises(SuiteError, match="not a suite family"):
        plan(tmp_path, "encoder_17m")
    with pytest.raises(SuiteError, match="run_name.*the suite sets these"):
        plan(tmp_path, "smoke", overrides=["run_name=x"])


@pytest.mark.slow
def test_the_smoke_suite_trains_skips_reports_and_refuses_other_data(tmp_path):
    suite_dir, data = tmp_path / "suite", tmp_path / "data"
    common = ["recipe=smoke", "sizes=[micro]", "cross=true", f"suite_dir={suite_dir}",
              f"data_dir={data}", *SHORT]
    code, out, err = run_suite(*common)
    assert code == 0, err
    members = ["encoder_micro", "decoder_micro", "encoder_from_decoder_micro", "decoder_from_encoder_micro"]
    table = pd.read_csv(suite_dir / "report" / "suite.csv")
    assert list(table.columns[:6]) == ["member", "size", "parameters", "objective", "origin", "series"]
    assert sorted(set(table["member"])) == sorted(members)
    assert set(table["series"]) == {"encoders", "decoders", "encoder-from-decoder", "decoder-from-encoder"}
    assert table.groupby("member")["task"].nunique().nunique() == 1  # every member on the same tasks
    assert (table["parameters"] > 0).all()
    report = (suite_dir / "report" / "report.md").read_text()
    assert "ladder.png" in report and ", 0 differ." in report
    assert "encoder_micro vs decoder_micro" in report
    assert "encoder_from_decoder_micro vs decoder_from_encoder_micro" in report

    # Again: every member is done, nothing is trained (no log grows, no checkpoint is added).
    logs = {m: (suite_dir / "logs" / f"{m}.log").stat().st_size for m in members}
    checkpoints = sorted(p.name for p in suite_dir.glob("*/checkpoints/*"))
    code, out, err = run_suite(*common)
    assert code == 0, err
    assert logs == {m: (suite_dir / "logs" / f"{m}.log").stat().st_size for m in members}
    assert checkpoints == sorted(p.name for p in suite_dir.glob("*/checkpoints/*"))

    code, out, _ = run_suite(*common, "status")
    assert code == 0
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert {m: lines[m][1] for m in members} == {m: "done" for m in members}
    assert int(lines["encoder_micro"][2].replace(",", "")) > 12_000  # past its pretrain phase

    # A report rebuilt from the runs alone.
    (suite_dir / "report" / "suite.csv").unlink()
    assert compare_main(["--suite", str(suite_dir)]) == 0
    assert pd.read_csv(suite_dir / "report" / "suite.csv").equals(table)

    # The same directory with other data, or as another family, is refused, naming the difference.
    code, _, err = run_suite(*[a for a in common if not a.startswith("data_dir")],
                             f"data_dir={tmp_path / 'other'}")
    assert code == 2 and "data_dir" in err and "other" in err
    code, _, err = run_suite("recipe=ettin", f"suite_dir={suite_dir}")
    assert code == 2 and "recipe=smoke suite" in err


@pytest.mark.slow
def test_a_failing_member_does_not_stop_the_others_and_its_cross_member_waits(tmp_path):
    suite_dir = tmp_path / "suite"
    # The decoder's data does not exist: it fails; the encoder still trains; the encoder-from-decoder
    # member is not started and says why.
    code, out, err = run_suite("recipe=smoke", "sizes=[micro]", "cross=true", f"suite_dir={suite_dir}",
                               f"data_dir={tmp_path / 'data'}", *SHORT, "objective=clm")
    assert code == 2 and "objective" in err  # the suite sets the objective itself
    (tmp_path / "broken").mkdir()
    code, out, err = run_suite("recipe=smoke", "sizes=[micro]", "cross=true", f"suite_dir={suite_dir}",
                               f"data_dir={tmp_path / 'data'}", *SHORT,
                               "tokenizer=" + str(tmp_path / "broken"))
    assert code == 1
    record = json.loads((suite_dir / "suite.json").read_text())["exits"]
    assert record["encoder_micro"] != 0 and record["decoder_micro"] != 0
    assert "encoder_from_decoder_micro: failed (its base did not finish)" in err
    assert str(suite_dir / "logs" / "encoder_micro.log") in err


def test_the_papers_scores_are_drawn_beside_the_native_members_of_ettin_sizes():
    published = json.loads((Path(__file__).resolve().parents[1] / "ettin" / "evaluation" /
                            "paper_scores.json").read_text())["models"]
    # encoder_17m and decoder_17m scored on a task each table reports and one it does not; a smoke
    # size and a cross member (the paper's tables have neither) on the same tasks.
    rows = []
    for member, size, params, series in (("encoder_17m", "17m", 17e6, "encoders"),
                                         ("decoder_17m", "17m", 17e6, "decoders"),
                                         ("encoder_tiny", "tiny", 2.8e5, "encoders"),
                                         ("encoder_from_decoder_17m", "17m", 17e6, "encoder-from-decoder")):
        for task in ("mnli", "piqa", "smoke_cloze"):
            rows.append([member, size, params, "x", "x", series, task, "c", "acc", 0.5, "higher", 0.01, 0.48, 0.52,
                         "test", None])
    table = pd.DataFrame(rows, columns=COLUMNS)
    paper = paper_points(table)
    assert sorted(zip(paper["series"], paper["task"])) == [("decoders", "piqa"), ("encoders", "mnli")]
    expected = {("encoders", "mnli"): published["encoder-17m"]["scores"]["mnli"] / 100,
                ("decoders", "piqa"): published["decoder-17m"]["scores"]["piqa"] / 100}
    assert {(s, t): v for s, t, v in zip(paper["series"], paper["task"], paper["score"])} == expected
    assert all(paper["source"].str.startswith("arXiv 2507.11412"))

    figure = plot_ladder(table, paper)
    panel = next(a for a in figure.axes if a.get_title().startswith("mnli"))
    hollow = [line for line in panel.get_lines() if line.get_label() == "encoders (paper)"]
    assert [(x, y) for line in hollow for x, y in line.get_xydata()] == [(17e6, expected[("encoders", "mnli")])]
    assert [t.get_text() for t in panel.get_xticklabels()] == ["280k", "17M"]


def test_a_member_stopped_at_an_intermediate_phase_end_is_not_finished(tmp_path):
    from ettin.cluster.suite_members import run_finished
    from ettin.train.config import compose

    cfg = compose("smoke", [f"output_dir={tmp_path}", "run_name=m", "pair=false"])
    phases = cfg.phases_to_run()
    assert len(phases) > 1

    def phase_end(index: int) -> None:
        checkpoint = tmp_path / "m" / "checkpoints" / f"{phases[index]}-end"
        checkpoint.mkdir(parents=True)
        (checkpoint / "meta.json").write_text(json.dumps({
            "phase": phases[index], "phase_index": index, "phase_end": True, "kind": "phase_end",
            "step": 10 * (index + 1), "tokens": 1000 * (index + 1)}))
        (checkpoint / "COMPLETE").write_text("")

    assert not run_finished(tmp_path / "m", cfg)
    for index in range(len(phases) - 1):
        phase_end(index)
        assert not run_finished(tmp_path / "m", cfg), phases[index]
    phase_end(len(phases) - 1)
    assert run_finished(tmp_path / "m", cfg)


def test_cross_members_are_tested_against_their_base_and_their_native_kind_and_averages_carry_errors():
    """encoder_from_decoder_tiny is 0.01 from encoder_tiny (stderr 0.02 each: within noise) and 0.3 from its
    base decoder_tiny (ahead of it); a category average's stderr is sqrt(sum stderr^2) / tasks."""
    members = [{"name": n, "role": r, "size": "tiny", "origin": "cross" if "_from_" in r else "native"}
               for n, r in (("encoder_tiny", "encoder"), ("decoder_tiny", "decoder"),
                            ("encoder_from_decoder_tiny", "encoder_from_decoder"))]
    score = {"encoder_tiny": 0.60, "decoder_tiny": 0.30, "encoder_from_decoder_tiny": 0.61}
    evaluation = {"models": {name: {"kind": "decoder" if name == "decoder_tiny" else "encoder", "objective": "x",
                                    "parameters": 1, "tasks": {
        task: {"category": "classification", "metric": "acc", "score": value, "stderr": stderr,
               "ci95": [value - 0.04, value + 0.04], "higher_is_better": True}
        for task, stderr in (("a", 0.02), ("b", 0.04))}} for name, value in score.items()}}
    compared = cross_comparisons(members, evaluation)
    verdicts = {(row.against, row.task): row.verdict for row in compared.itertuples()}
    ahead = "encoder_from_decoder_tiny ahead"
    assert verdicts == {("decoder_tiny", "a"): ahead, ("decoder_tiny", "b"): ahead,
                        ("encoder_tiny", "a"): "within noise", ("encoder_tiny", "b"): "within noise"}
    table = suite_table(members, evaluation)
    averaged = category_averages(table).set_index("member")
    assert averaged.loc["encoder_tiny", "stderr"] == pytest.approx((0.02 ** 2 + 0.04 ** 2) ** 0.5 / 2)
    figure = plot_ladder(pd.concat([table, category_averages(table)], ignore_index=True))
    assert all(len(axis.containers) == 3 for axis in figure.axes if axis.get_visible())  # bars on each series


def test_seeds_make_one_member_per_seed_and_the_ladder_draws_each_seed(tmp_path):
    suite = plan(tmp_path / "s", "smoke", sizes=["tiny"], cross=True, seeds=2)
    assert [m.name for m in suite.members] == [
        "encoder_tiny-seed1", "decoder_tiny-seed1", "encoder_from_decoder_tiny-seed1", "decoder_from_encoder_tiny-seed1",
        "encoder_tiny-seed2", "decoder_tiny-seed2", "encoder_from_decoder_tiny-seed2", "decoder_from_encoder_tiny-seed2"]
    one = plan(tmp_path / "o", "smoke", sizes=["tiny"], cross=True)
    native = {m.name: m.config().seed for m in one.members}
    seeds = {m.name: m.config().seed for m in suite.members}
    assert seeds["encoder_tiny-seed1"] == native["encoder_tiny"] and seeds["encoder_tiny-seed2"] == native["encoder_tiny"] + 1
    assert seeds["decoder_from_encoder_tiny-seed2"] == native["decoder_from_encoder_tiny"] + 1
    cross = suite.member("decoder_from_encoder_tiny-seed2")
    assert cross.base == "encoder_tiny-seed2" and cross.config().init.endswith("encoder_tiny-seed2")
    with pytest.raises(SuiteError, match="seed=5: the suite sets these"):
        plan(tmp_path / "x", "smoke", sizes=["tiny"], seeds=2, overrides=["seed=5"])

    rows = [[f"encoder_tiny-seed{seed}", "tiny", 2.8e5, "mlm", "native", "encoders", "t", "c", "acc", score, "higher",
             0.01, score - 0.02, score + 0.02, "test", seed] for seed, score in ((1, 0.5), (2, 0.6))]
    table = pd.DataFrame(rows, columns=COLUMNS)
    (axis,) = [a for a in plot_ladder(table).axes if a.get_visible()]
    lines = {line.get_label(): line.get_xydata().tolist() for line in axis.get_lines()}
    assert lines["encoders"] == [[2.8e5, pytest.approx(0.55)]]
    assert lines["encoders (each seed)"] == [[2.8e5, 0.5], [2.8e5, 0.6]]


def test_the_suite_table_and_ladder_carry_the_diffusion_members_as_their_own_series():
    """A suite of objectives=[mlm,clm,mdlm]: the diffusion members (encoders to transformers) are the masked
    diffusion series in suite.csv's table and a third line of the ladder, in its own colour."""
    members = [{"name": member_name(role, size), "role": role, "size": size, "origin": "native"}
               for size in ("tiny", "micro") for role in ("encoder", "decoder", "diffusion")]
    parameters = {"tiny": 1000, "micro": 5000}
    score = {"encoder": 0.6, "decoder": 0.5, "diffusion": 0.4}
    evaluation = {"models": {m["name"]: {
        "kind": "decoder" if m["role"] == "decoder" else "encoder",
        "objective": {"encoder": "mlm", "decoder": "clm", "diffusion": "mdlm"}[m["role"]],
        "parameters": parameters[m["size"]],
        "tasks": {"smoke_cloze": {"category": "generation", "metric": "acc", "higher_is_better": True,
                                  "score": score[m["role"]] + (m["size"] == "micro") / 10, "stderr": 0.01}}}
        for m in members}}
    table = suite_table(members, evaluation)
    diffusion = table[table["member"].str.startswith("diffusion_")]
    assert set(diffusion["series"]) == {"masked diffusion"} and set(diffusion["objective"]) == {"mdlm"}
    assert set(table["series"]) == {"encoders", "decoders", "masked diffusion"}
    (axis,) = [a for a in plot_ladder(table).axes if a.get_visible()]
    lines = {line.get_label(): line for line in axis.get_lines() if not line.get_label().startswith("_")}
    assert sorted(lines) == ["decoders", "encoders", "masked diffusion"]  # the error bars' lines are unlabelled
    assert lines["masked diffusion"].get_xydata().tolist() == [[1000, 0.4], [5000, pytest.approx(0.5)]]
    assert len({line.get_color() for line in lines.values()}) == 3
