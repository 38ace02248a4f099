"""python -m ettin.train -m: one run per combination, named from the overrides that vary, run one after
another; sweep.csv says which failed and where its log is, and a failure does not stop the others."""

from __future__ import annotations

import contextlib
import csv
import io

import pytest

from ettin.cluster.sweep import sweep_members
from ettin.train.cli import main


def test_every_combination_is_a_member_named_from_what_varies():
    members, shared = sweep_members(["optim.lr=1e-3,3e-3", "phases.pretrain.tokens=1000,2000",
                                     "trainer.num_workers=0", "data.pretrain=[{path: builtin}]"])
    assert shared == ["trainer.num_workers=0", "data.pretrain=[{path: builtin}]"]
    assert [m.name for m in members] == ["lr-0.001_tokens-1000", "lr-0.001_tokens-2000",
                                         "lr-0.003_tokens-1000", "lr-0.003_tokens-2000"]
    assert members[1].overrides == ("optim.lr=0.001", "phases.pretrain.tokens=2000")  # as Hydra reads them


@pytest.mark.slow
def test_a_failing_member_does_not_stop_the_others(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["-m", f"output_dir={tmp_path}", f"data_dir={tmp_path / 'data'}", "pair=false",
                     "run_name=s", f"tokenizer={tmp_path / 'missing'},builtin",
                     "phase_order=[pretrain]", "phases.pretrain.tokens=8_000",
                     "phases.pretrain.warmup_tokens=1_000", "trainer.num_workers=0",
                     "trainer.log_every_steps=2", "export_at_end=false", "eval_at_end=false"])
    assert code == 1
    with (tmp_path / "s-sweep" / "sweep.csv").open() as f:
        rows = {r["member"]: r for r in csv.DictReader(f)}
    failed, done = rows.values()
    assert failed["member"].startswith("tokenizer-") and done["member"] == "tokenizer-builtin"
    assert failed["status"].startswith("failed (exit 2; log ") and "logs" in failed["status"]
    assert done["status"] == "done" and float(done["pretrain val loss"]) > 0
    assert "failed:" in out.getvalue()
