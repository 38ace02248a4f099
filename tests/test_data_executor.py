"""executor=local (datatrove): several tasks and a merge step give the very folder a single-process
preparation gives; a task that dies is run again on relaunch, without duplicates."""

from __future__ import annotations

import json

import pytest
from data_fixtures import data_root, tiny_tokenizer  # noqa: F401

from ettin.data.prepare import main

RUN_METADATA = {"seconds", "seconds_in_main_process", "tokens_per_second", "num_proc", "created"}


def prepared(tmp_path, tokenizer, name, *extra):
    out = tmp_path / name
    assert main(["input=builtin", f"output={out}", f"tokenizer={tokenizer}", "max_seq_len=64",
                 "max_documents=300", "progress=false", *extra]) == 0
    return out


def assert_same_folder(a, b):
    for split in ("train", "validation"):
        names = sorted(p.name for p in (a / split).iterdir())
        assert names == sorted(p.name for p in (b / split).iterdir())
        for name in names:
            assert (a / split / name).read_bytes() == (b / split / name).read_bytes(), name
    summaries = [json.loads((f / "summary.json").read_text()) for f in (a, b)]
    assert {k: v for k, v in summaries[0].items() if k not in RUN_METADATA} == \
        {k: v for k, v in summaries[1].items() if k not in RUN_METADATA}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_tokenizer):
    return prepared(tmp_path_factory.mktemp("single"), tiny_tokenizer, "single", "num_proc=1")


@pytest.mark.slow
def test_local_executor_with_four_tasks_equals_one_process(single, tmp_path, tiny_tokenizer):
    out = prepared(tmp_path, tiny_tokenizer, "tasks", "executor=local", "tasks=4", "workers=2")
    assert_same_folder(single, out)
    assert not (tmp_path / "tasks.parts").exists()


def test_a_failed_task_is_run_again_on_relaunch(single, tmp_path, tiny_tokenizer, monkeypatch):
    import ettin.data.executor as executor

    original = executor._tokenize_unit
    calls = {"n": 0}

    def dies_midway(unit):
        calls["n"] += 1
        if calls["n"] == 2:  # in the second task (task 0 tokenized unit 0, task 1 unit 1)
            raise RuntimeError("killed")
        return original(unit)

    monkeypatch.setattr(executor, "_tokenize_unit", dies_midway)
    args = ["executor=local", "tasks=3", "workers=1"]
    with pytest.raises(RuntimeError, match="killed"):
        prepared(tmp_path, tiny_tokenizer, "relaunched", *args)
    parts = tmp_path / "relaunched.parts"
    assert (parts / "task-00000").is_dir() and not (parts / "task-00001").is_dir()
    monkeypatch.setattr(executor, "_tokenize_unit", original)
    ran = []
    monkeypatch.setattr(executor.TokenizeTask, "__call__", lambda self, data=None, rank=0, world_size=1:
                        ran.append(rank) or original_call(self, data, rank, world_size))
    out = prepared(tmp_path, tiny_tokenizer, "relaunched", *args)
    assert ran == [1, 2]  # the finished task was skipped
    assert_same_folder(single, out)


original_call = __import__("ettin.data.executor", fromlist=["TokenizeTask"]).TokenizeTask.__call__


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_executor_on_the_local_cluster(cluster, single, tmp_path, tiny_tokenizer,
                                             monkeypatch):
    """executor=slurm submits the tokenize tasks and the dependent merge job to the real local Slurm
    the suite starts; the folder that appears equals the single-process one."""
    import time

    from datatrove.executor import SlurmPipelineExecutor

    # The local node declares no memory (1 MB): ask for 1M, and skip datatrove's stats job, which
    # always asks for 1G.
    monkeypatch.setattr(SlurmPipelineExecutor, "launch_merge_stats", lambda self: None)
    out = tmp_path / "slurm"
    assert main(["input=builtin", f"output={out}", f"tokenizer={tiny_tokenizer}", "max_seq_len=64",
                 "max_documents=300", "progress=false", "executor=slurm", "partition=debug",
                 "tasks=2", "time=00:15:00", "sbatch_args='mem-per-cpu=1M'"]) == 0
    deadline = time.monotonic() + 400
    while not (out / "COMPLETE").exists() and time.monotonic() < deadline:
        time.sleep(2)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in
                     (tmp_path / "slurm.parts" / "logs").rglob("*.out")) if not out.exists() else ""
    assert (out / "COMPLETE").exists(), logs
    assert_same_folder(single, out)


FAKE_SBATCH = """#!/bin/sh
# Counts submissions; prints what sbatch prints; keeps the script and its arguments.
n=$(( $(cat "$FAKE_SLURM/count" 2>/dev/null || echo 100) + 1 )); echo $n > "$FAKE_SLURM/count"
for last in "$@"; do :; done; cp "$last" "$FAKE_SLURM/job-$n.sbatch"; echo "$@" > "$FAKE_SLURM/job-$n.args"
echo "Submitted batch job $n"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch and squeue on PATH that only record and answer: ``queue`` is what squeue shows."""
    folder = tmp_path / "fake-slurm"
    folder.mkdir()
    (folder / "sbatch").write_text(FAKE_SBATCH)
    (folder / "squeue").write_text('#!/bin/sh\ncat "$FAKE_SLURM/queue" 2>/dev/null\n')
    (folder / "scancel").write_text('#!/bin/sh\necho "$@" >> "$FAKE_SLURM/cancelled"\n')
    for name in ("sbatch", "squeue", "scancel"):
        (folder / name).chmod(0o755)
    monkeypatch.setenv("FAKE_SLURM", str(folder))
    monkeypatch.setenv("PATH", f"{folder}:{__import__('os').environ['PATH']}")
    return folder


def submissions(folder, after: int = 100) -> list[tuple[str, str]]:
    """(script, arguments) of each job submitted after job ``after``."""
    count = int((folder / "count").read_text())
    return [((folder / f"job-{n}.sbatch").read_text(), (folder / f"job-{n}.args").read_text())
            for n in range(after + 1, count + 1)]


def test_a_slurm_relaunch_submits_no_task_that_is_queued_running_or_done(tmp_path, tiny_tokenizer,
                                                                         fake_slurm):
    args = ["input=builtin", f"output={tmp_path / 'out'}", f"tokenizer={tiny_tokenizer}", "max_seq_len=64",
            "max_documents=300", "progress=false", "executor=slurm", "partition=debug", "tasks=4",
            "sbatch_args=\"exclude=n1,n2 --qos=high --exclusive\""]
    assert main(args) == 0
    first = submissions(fake_slurm)
    tokenize_script = first[0][0]
    assert "#SBATCH --array=0-3" in tokenize_script
    assert "#SBATCH --exclude=n1,n2" in tokenize_script and "#SBATCH --qos=high" in tokenize_script
    assert "#SBATCH --exclusive\n" in tokenize_script
    merge = next(n for n, (script, _) in enumerate(first, 101) if "logs/merge" in script)
    assert "--dependency=afterok:101" in (fake_slurm / f"job-{merge}.args").read_text()

    # Task 0 is done, task 1 runs, task 2 is queued, task 3 failed (gone from the queue); the merge
    # job waits on a dependency that can never be satisfied now.
    logs = tmp_path / "out.parts" / "logs"
    (logs / "tokenize" / "completions").mkdir(parents=True)
    (logs / "tokenize" / "completions" / "00000").write_text("")
    (fake_slurm / "queue").write_text(f"101|1|None\n101|2|Priority\n{merge}|0|DependencyNeverSatisfied\n")
    count = int((fake_slurm / "count").read_text())
    assert main(args) == 0
    again = submissions(fake_slurm, after=count)
    assert json.loads((logs / "tokenize" / "ranks_to_run.json").read_text()) == [3]
    assert "#SBATCH --array=0-0" in again[0][0]
    assert (fake_slurm / "cancelled").read_text().split() == [str(merge)]
    new_merge = next(n for n, (script, _) in enumerate(again, count + 1) if "logs/merge" in script)
    # The new merge waits for the tasks still queued or running and for the resubmitted one.
    assert f"--dependency=afterok:101:{count + 1}" in (fake_slurm / f"job-{new_merge}.args").read_text()


@pytest.mark.parametrize("in_a_venv", [True, False])
def test_slurm_jobs_activate_the_virtual_environment_of_the_submitting_python(tmp_path, tiny_tokenizer,
                                                                             fake_slurm, monkeypatch,
                                                                             in_a_venv):
    """datatrove's jobs call launch_pickled_pipeline by name: they must run in the submitter's venv even
    when it was not activated (``.venv/bin/python -m ettin.data.prepare ...``)."""
    import sys

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", str(venv if not in_a_venv else tmp_path / "system"))
    assert main(["input=builtin", f"output={tmp_path / 'out'}", f"tokenizer={tiny_tokenizer}",
                 "max_seq_len=64", "max_documents=300", "progress=false", "executor=slurm",
                 "partition=debug", "tasks=2"]) == 0
    scripts = [script for script, _ in submissions(fake_slurm)]
    assert len(scripts) >= 2  # the tokenize tasks, the merge (and datatrove's stats jobs)
    activation = f"source {venv / 'bin' / 'activate'}"
    assert all((activation in script) == in_a_venv for script in scripts)


def test_tasks_that_saw_another_input_are_not_merged(tmp_path):
    from ettin.data.executor import MANIFEST, input_counts
    from ettin.data.reading import PrepareError

    for task, skipped in enumerate([{"empty": 2}, {"empty": 2}, {"empty": 3}]):
        folder = tmp_path / f"task-{task:05d}"
        folder.mkdir()
        (folder / MANIFEST).write_text(json.dumps(
            {"units": [], "unit_count": 5, "skips": {"documents": skipped, "files": {}}}))
    assert input_counts(tmp_path, 2)["skips"]["documents"] == {"empty": 2}
    with pytest.raises(PrepareError, match="tasks 2 saw another input than task 0.*input changed"):
        input_counts(tmp_path, 3)
