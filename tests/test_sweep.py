"""python -m ettin.train -m: one run per combination, named from the overrides that vary, run one after
another; sweep.csv says which failed and where its log is, and a failure does not stop the others."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import pytest

from ettin.cluster.sweep import sweep_members
from ettin.train_command import main


def test_every_combination_is_a_member_named_from_what_varies():
    members, shared = sweep_members(["optim.lr=1e-3,3e-3", "phases.pretrain.tokens=1000,2000",
                                     "trainer.num_workers=0", "data.pretrain=[{path: builtin}]"])
    assert shared == ["trainer.num_workers=0", "data.pretrain=[{path: builtin}]"]
    assert [m.name for m in members] == ["lr-0.001_tokens-1000", "lr-0.001_tokens-2000",
                                         "lr-0.003_tokens-1000", "lr-0.003_tokens-2000"]
    assert members[1].overrides == ("optim.lr=0.001", "phases.pretrain.tokens=2000")  # as Hydra reads them


def test_values_that_lose_characters_in_a_member_name_keep_apart_by_a_hash():
    members, _ = sweep_members(["tokenizer=/data/tok_a/v1,/data/tok_av1", "optim.lr=1e-3"])
    names = [m.name for m in members]
    assert len(set(names)) == 2 and all(n.startswith("tokenizer-datatokav1-") for n in names), names
    # A value the name holds whole keeps its plain name.
    assert [m.name for m in sweep_members(["optim.lr=0.001,0.003"])[0]] == ["lr-0.001", "lr-0.003"]


def test_a_rerun_whose_member_would_get_other_overrides_is_refused_naming_them(tmp_path):
    from ettin.cluster.sweep import MEMBER_RECORD, plan_sweep
    from ettin.train.config import ConfigError

    base = [f"output_dir={tmp_path}", "run_name=s", "pair=false", "optim.lr=0.001,0.003"]
    plan = plan_sweep("smoke", [*base, "trainer.num_workers=0"])
    for member in plan.members:
        plan.write_record(member)
    assert (tmp_path / "s-sweep" / "lr-0.001" / MEMBER_RECORD).is_file()
    plan_sweep("smoke", [*base, "trainer.num_workers=0"])  # the same sweep again: accepted
    with pytest.raises(ConfigError, match=r"sweep member lr-0.001 .* created for other overrides "
                                          r"\(there: trainer.num_workers=0; now: trainer.num_workers=1\)"):
        plan_sweep("smoke", [*base, "trainer.num_workers=1"])
    code = main(["-m", *base, "trainer.num_workers=1"])
    assert code == 2


def test_a_crash_while_writing_sweep_csv_leaves_the_previous_table_whole(tmp_path, monkeypatch):
    from ettin.cluster.sweep import plan_sweep, write_table

    plan = plan_sweep("smoke", [f"output_dir={tmp_path}", "run_name=s", "pair=false", "optim.lr=0.001,0.003"])
    table = write_table(plan, {m.name: "not started" for m in plan.members})
    before = table.read_text()
    assert before.count("not started") == 2

    def crash(self, rows):
        raise OSError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerows", crash)
    with pytest.raises(OSError, match="disk full"):
        write_table(plan, {m.name: "done" for m in plan.members})
    assert table.read_text() == before


def sweep(argv: list[str]) -> tuple[int, str, dict[str, dict]]:
    """(exit status, what it printed, sweep.csv's rows by member)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    with (Path(argv[1].split("=", 1)[1]) / "s-sweep" / "sweep.csv").open() as f:
        return code, out.getvalue(), {r["member"]: r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_a_failing_member_does_not_stop_the_others_and_a_rerun_skips_finished_ones(tmp_path):
    argv = ["-m", f"output_dir={tmp_path}", f"data_dir={tmp_path / 'data'}", "pair=false",
            "run_name=s", f"tokenizer={tmp_path / 'missing'},builtin",
            "phase_order=[pretrain]", "phases.pretrain.tokens=8_000",
            "phases.pretrain.warmup_tokens=1_000", "trainer.num_workers=0",
            "trainer.log_every_steps=2", "export_at_end=false", "eval_at_end=false"]
    code, out, rows = sweep(argv)
    assert code == 1
    failed, done = rows.values()
    assert failed["member"].startswith("tokenizer-") and done["member"] == "tokenizer-builtin"
    assert failed["status"].startswith("failed (exit 2; log ") and "logs" in failed["status"]
    assert done["status"] == "done" and float(done["pretrain val loss"]) > 0
    assert "failed:" in out

    # Again: the finished member is not run (its log does not grow), the failed one runs again.
    logs = tmp_path / "s-sweep" / "logs"
    sizes = {name: (logs / f"{name}.log").stat().st_size for name in rows}
    code, out, again = sweep(argv)
    assert code == 1 and again == rows
    assert (logs / "tokenizer-builtin.log").stat().st_size == sizes["tokenizer-builtin"]
    assert (logs / f"{failed['member']}.log").stat().st_size > sizes[failed["member"]]
