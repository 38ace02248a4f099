"""Suites and sweeps on Slurm (launcher=slurm): the job arrays ettin.cluster.launch renders (one task
per member, the cross members' array after its bases), the second submission that submits nothing,
the suite report built from the arrays' runs, and bad launcher input.

The array logic is checked first against stand-ins for sbatch and squeue (no cluster), then end to
end on the real local cluster of .ci/slurm-setup.sh (the ``cluster`` fixture)."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ettin.cluster.launch import array_spec, recorded_job, render, slurm_args
from ettin.cluster.suite_members import member_dir, plan, status, submit_slurm
from ettin.suite import main as suite_main
from ettin.train_command import main as train_main

# A few steps per phase, and one quick task (the suite's evaluation runs here, after the arrays).
TINY = ["phases.pretrain.tokens=4_000", "phases.pretrain.warmup_tokens=1_000",
        "phases.pretrain.checkpoint_every_tokens=0", "phases.pretrain.val_every_tokens=0",
        "phases.extension.tokens=2_000", "phases.decay.tokens=2_000", "phases.cross.tokens=2_000",
        "phases.cross.warmup_tokens=500", "phases.cross.decay_tokens=1_000", "trainer.num_workers=0",
        "trainer.log_every_steps=1", "eval_tasks=smoke_lm", "eval_limit=8"]
CPU = slurm_args({"cpus_per_node": "1"})


def run(main, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def task_of(script: str, index: int) -> subprocess.CompletedProcess:
    """The script's run selection as array task ``index`` runs it: the run's name, dir and argv."""
    lines = script.splitlines()
    start, end = lines.index('case "$SLURM_ARRAY_TASK_ID" in'), lines.index("esac")
    program = "\n".join([f"SLURM_ARRAY_TASK_ID={index}", *lines[start:end + 1],
                         'printf "%s\\n" "$RUN_NAME" "$RUN_DIR" "${COMMAND[@]}"'])
    return subprocess.run(["bash", "-c", program], capture_output=True, text=True)


def test_the_array_script_runs_one_member_per_task_and_the_cross_array_waits(tmp_path):
    suite = plan(tmp_path / "s", "smoke", ["micro"], cross=True, overrides=["trainer.num_workers=0"])
    native = [m for m in suite.members if m.origin == "native"]
    script = render(array_spec("s-native", tmp_path / "s" / "slurm" / "native", CPU,
                               [m.argv() for m in native]))
    lines = script.splitlines()
    assert "#SBATCH --array=0-1" in lines and "#SBATCH --requeue" in lines
    assert f"#SBATCH --output={(tmp_path / 's' / 'slurm' / 'native').resolve()}/%A_%a.log" in lines
    assert not any(line.startswith("#SBATCH --dependency") for line in lines)
    assert 'exec >>"$RUN_DIR/slurm.log" 2>&1' in lines  # each member logs into its own run dir
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    for index, member in enumerate(native):
        chosen = task_of(script, index).stdout.splitlines()
        assert chosen[:2] == [member.name, str(member_dir(member))]
        # The member's own argv, with the allocation as python -m ettin.launch sets it.
        assert chosen[2:5] == [sys.executable, "-m", "ettin.train"]
        assert chosen[5:] == [*member.argv(), "trainer.num_nodes=1", "trainer.devices=1",
                              "trainer.accelerator=cpu"]
    missing = task_of(script, 2)
    assert missing.returncode == 2 and "array task 2 has no run" in missing.stderr

    cross = render(array_spec("s-cross", tmp_path / "s" / "slurm" / "cross", CPU,
                              [m.argv() for m in suite.members if m.origin == "cross"], ["7_0", "7_1"]))
    assert "#SBATCH --dependency=afterok:7_0:7_1" in cross.splitlines()
    assert "#SBATCH --kill-on-invalid-dep=yes" in cross.splitlines()


def fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """sbatch and squeue stand-ins on PATH: sbatch keeps each script and answers job ids 101, 102,
    ...; squeue prints the file ``queue`` (``<job>_<task>|<id>|<state>`` lines)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/bash\nn=$(ls {bin_dir}/*.submitted 2>/dev/null | wc -l)\n'
        f'cp "$2" {bin_dir}/$((101 + n)).submitted\necho $((101 + n))\n')
    (bin_dir / "squeue").write_text(f"#!/bin/bash\ncat {tmp_path}/queue 2>/dev/null || true\n")
    for tool in ("sbatch", "squeue"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_a_second_submission_submits_only_what_no_job_trains(tmp_path, monkeypatch):
    bin_dir = fake_slurm(tmp_path, monkeypatch)
    suite = plan(tmp_path / "s", "smoke", ["micro"], cross=True, overrides=["trainer.num_workers=0"])
    assert submit_slurm(suite, CPU) == ["101", "102"]
    native, cross = (bin_dir / "101.submitted").read_text(), (bin_dir / "102.submitted").read_text()
    assert "encoder_micro" in native and "encoder_from_decoder_micro" not in native
    assert "#SBATCH --dependency=afterok:101_0:101_1" in cross.splitlines()  # both bases
    assert {m.name: recorded_job(member_dir(m)) for m in suite.members} == {
        "encoder_micro": "101_0", "decoder_micro": "101_1",
        "encoder_from_decoder_micro": "102_0", "decoder_from_encoder_micro": "102_1"}

    # Every task still in the queue: nothing is submitted again; status says queued / running.
    (tmp_path / "queue").write_text("101_0|103|RUNNING\n101_1|104|PENDING\n102_0|105|PENDING\n"
                                    "102_1|106|PENDING\n")
    assert submit_slurm(suite, CPU) == []
    assert [r.state for r in status(suite)] == ["running", "queued", "queued", "queued"]

    # The decoder's task left the queue without finishing its run (and so its cross member's array
    # was cancelled): those two are resubmitted, the cross one after the new decoder task only.
    (tmp_path / "queue").write_text("101_0|103|RUNNING\n102_1|106|PENDING\n")
    assert [r.state for r in status(suite)] == ["running", "failed", "failed", "queued"]
    assert submit_slurm(suite, CPU) == ["103", "104"]
    assert "decoder_micro" in (bin_dir / "103.submitted").read_text()
    assert "encoder_micro " not in (bin_dir / "103.submitted").read_text()
    assert "#SBATCH --dependency=afterok:103_0" in (bin_dir / "104.submitted").read_text().splitlines()
    assert "#SBATCH --array=0-0" in (bin_dir / "104.submitted").read_text().splitlines()


def test_a_suite_that_never_submitted_does_not_ask_a_controller_that_is_down(tmp_path, monkeypatch):
    from ettin.cluster.launch import LaunchError

    bin_dir = fake_slurm(tmp_path, monkeypatch)
    (bin_dir / "squeue").write_text("#!/bin/bash\necho 'Unable to contact slurm controller' >&2\nexit 1\n")
    suite = plan(tmp_path / "s", "smoke", ["micro"], overrides=["trainer.num_workers=0"])
    assert [r.state for r in status(suite)] == ["not started", "not started"]  # local: Slurm unused
    assert submit_slurm(suite, CPU) == ["101"]  # no job of it can be queued yet
    with pytest.raises(LaunchError, match="squeue failed.*try again when the Slurm controller answers"):
        status(suite)  # now a job of it may be queued: guessing could train a member twice


def test_a_sweep_on_slurm_is_one_array_and_a_second_submission_submits_nothing(tmp_path, monkeypatch):
    bin_dir = fake_slurm(tmp_path, monkeypatch)
    argv = ["-m", f"output_dir={tmp_path}", "run_name=s", "pair=false", "optim.lr=1e-3,2e-3",
            "trainer.num_workers=0", "launcher=slurm", "slurm.cpus_per_node=1", "slurm.time=0:10:00"]
    code, out, err = run(train_main, *argv)
    assert code == 0, err
    script = (bin_dir / "101.submitted").read_text()
    assert "#SBATCH --array=0-1" in script.splitlines() and "#SBATCH --time=0:10:00" in script.splitlines()
    root = tmp_path / "s-sweep"
    assert task_of(script, 1).stdout.splitlines()[:2] == ["lr-0.002", str(root / "lr-0.002")]
    with (root / "sweep.csv").open() as f:
        rows = {r["member"]: r["status"] for r in csv.DictReader(f)}
    assert rows == {"lr-0.001": f"failed (job 101_0; log {root / 'lr-0.001' / 'slurm.log'})",
                    "lr-0.002": f"failed (job 101_1; log {root / 'lr-0.002' / 'slurm.log'})"}  # the stand-in queue is empty: gone

    (tmp_path / "queue").write_text("101_0|102|PENDING\n101_1|103|RUNNING\n")
    code, out, err = run(train_main, *argv)
    assert code == 0 and "nothing to submit" in out, err
    assert sorted(p.name for p in bin_dir.glob("*.submitted")) == ["101.submitted"]
    with (root / "sweep.csv").open() as f:
        assert [r["status"].split(" (")[0] for r in csv.DictReader(f)] == ["queued", "running"]


def test_bad_launcher_input_names_the_choices_and_the_fix(tmp_path):
    code, _, err = run(suite_main, "recipe=smoke", f"suite_dir={tmp_path}", "launcher=foo")
    assert code == 2 and "launcher=foo: choose one of local, slurm" in err
    code, _, err = run(suite_main, "recipe=smoke", f"suite_dir={tmp_path}", "slurm.partition=gpu")
    assert code == 2 and "slurm.partition given with launcher=local: add launcher=slurm" in err
    code, _, err = run(suite_main, "recipe=smoke", f"suite_dir={tmp_path}", "launcher=slurm",
                       "slurm.gpu=4")
    assert code == 2 and "slurm.gpu: not a Slurm option; choose from" in err and "slurm.gpus_per_node" in err
    code, _, err = run(train_main, "-m", f"output_dir={tmp_path}", "optim.lr=1e-3,2e-3", "launcher=foo")
    assert code == 2 and "choose one of local, slurm" in err
    code, _, err = run(train_main, "-m", f"output_dir={tmp_path}", "optim.lr=1e-3,2e-3", "slurm.time=1:00")
    assert code == 2 and "add launcher=slurm" in err
    code, _, err = run(train_main, f"output_dir={tmp_path}", "launcher=slurm")
    assert code == 2 and "a launcher submits sweeps (-m); submit one run with python -m ettin.launch" in err
    assert not any(tmp_path.iterdir())  # nothing written, nothing submitted


# ---------------------------------------------------------------------------------------------------
# On the local cluster


@pytest.mark.slow
@pytest.mark.slurm
def test_a_suite_on_slurm_trains_as_two_arrays_and_reports(cluster, tmp_path):
    suite_dir = tmp_path / "suite"
    common = ["recipe=smoke", "sizes=[micro]", "cross=true", f"suite_dir={suite_dir}",
              f"data_dir={tmp_path / 'data'}", *TINY, "launcher=slurm", "slurm.cpus_per_node=1"]
    code, out, err = run(suite_main, *common)
    assert code == 0, err
    members = ["encoder_micro", "decoder_micro", "encoder_from_decoder_micro", "decoder_from_encoder_micro"]
    jobs = {m: recorded_job(suite_dir / m) for m in members}
    native, cross = jobs["encoder_micro"].split("_")[0], jobs["encoder_from_decoder_micro"].split("_")[0]
    for job in (native, cross):
        cluster.track(job)
    assert jobs == {members[0]: f"{native}_0", members[1]: f"{native}_1",
                    members[2]: f"{cross}_0", members[3]: f"{cross}_1"}
    assert f"afterok:{native}_0" in cluster.state(cross).get("Dependency", "")
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert lines[members[2]] == lines[members[3]] == "queued"  # waiting for their bases

    # At once again: every member is queued or running, nothing is submitted.
    code, _, err = run(suite_main, *common)
    assert code == 0 and "nothing to submit" in err, err
    assert {m: recorded_job(suite_dir / m) for m in members} == jobs

    for member, job in jobs.items():
        state = cluster.wait(job, timeout=240)
        log = (suite_dir / member / "slurm.log").read_text(errors="replace")
        assert state["JobState"] == "COMPLETED", (member, state, log[-3000:])
        assert f"of run {member}:" in log and "world size 1" in log  # its own log, topology checked

    # After the arrays: the same command submits nothing, evaluates every member and reports.
    code, out, err = run(suite_main, *common)
    assert code == 0, err
    assert {m: recorded_job(suite_dir / m) for m in members} == jobs
    table = pd.read_csv(suite_dir / "report" / "suite.csv")
    assert sorted(set(table["member"])) == sorted(members)
    code, out, _ = run(suite_main, *common[:5], "status")
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["done"] * 4
