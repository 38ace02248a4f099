"""SLURM: the sbatch template and ettin.cluster.launch, preemption and requeue, on a real local Slurm cluster.

The cluster (one node, CPU tasks, gloo) comes from .ci/slurm-setup.sh through the ``cluster``
fixture; without Slurm these tests skip with the reason, except in CI where they fail.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ettin.cluster import launch
from ettin.train import preemption, topology
from ettin.cluster.launch import JobSpec, render, submit
from ettin.train.topology import TopologyError, check_topology

TESTS = Path(__file__).resolve().parent
TINY = TESTS / "slurm_tiny_train.py"

# Loss agreement of 2 tasks x 1 micro-batch with 1 process x 2 micro-batches (same global batch):
# only the order of float reductions differs (measured: <= 5e-7 over 24 steps).
LOSS_ATOL = 1e-4


# ---------------------------------------------------------------------------------------------------
# Rendering and checks (no cluster needed)


def test_render_fills_the_options_and_drops_the_empty_ones(tmp_path):
    spec = JobSpec(run_name="r1", run_dir=tmp_path / "runs" / "r1", command=["python", "-m", "ettin.train",
                   "recipe=smoke", "optim.lr=1e-3", "data.pretrain=[{path: /d, weight: 1}]"],
                   nodes=2, tasks_per_node=4, gpus_per_node=4, cpus_per_task=6, account="acc",
                   partition="gpu", time="1-00:00:00", signal_lead_s=240, workdir=tmp_path,
                   sbatch_args=["--exclusive"], env={"NCCL_SOCKET_IFNAME": "ib0"})
    text = render(spec)
    for line in ["#SBATCH --job-name=ettin-r1", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=6", "#SBATCH --account=acc",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1-00:00:00", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@240", "#SBATCH --open-mode=append", "#SBATCH --exclusive",
                 f"#SBATCH --output={(tmp_path / 'runs' / 'r1' / 'slurm.log').resolve()}",
                 "export NCCL_SOCKET_IFNAME=ib0"]:
        assert line in text.splitlines(), line
    assert "{{" not in text and "#SBATCH --qos" not in text
    assert "'data.pretrain=[{path: /d, weight: 1}]'" in text  # quoted for the shell, passed verbatim
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # valid bash

    cpu = render(JobSpec(run_name="r2", run_dir=tmp_path / "r2", command=["true"], tasks_per_node=2))
    for option in ("--gpus-per-node", "--account", "--partition", "--qos", "--time"):
        assert f"#SBATCH {option}" not in cpu


def test_launch_dry_run_passes_the_overrides_through_and_sets_the_world(tmp_path, capsys):
    code = launch.main(["--nodes", "2", "--gpus-per-node", "4", "--account", "acc", "--time", "2:00:00",
                        "--dry-run", "--", "recipe=smoke", f"output_dir={tmp_path}", "run_name=big",
                        "optim.lr=1e-3"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"#SBATCH --output={tmp_path.resolve()}/big/slurm.log" in out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=4" in out
    command = next(line for line in out.splitlines() if line.startswith("RUN_NAME=big RUN_DIR="))
    assert command.endswith(
        f"-m ettin.train recipe=smoke output_dir={tmp_path} run_name=big optim.lr=1e-3 "
        "trainer.num_nodes=2 trainer.devices=4 trainer.accelerator=gpu)")
    assert '"${COMMAND[@]}" &' in out and "#SBATCH --array" not in out and "exec >>" not in out
    assert not (tmp_path / "big").exists()  # a dry run writes nothing


def test_launch_refuses_a_config_that_contradicts_the_allocation(tmp_path, capsys):
    code = launch.main(["--gpus-per-node", "4", "--dry-run", "--", "recipe=smoke",
                        f"output_dir={tmp_path}", "trainer.devices=8"])
    assert code == 2 and "trainer.devices=8 contradicts" in capsys.readouterr().err
    assert launch.main(["--dry-run", "--", "recipe=smoke"]) == 2  # neither GPUs nor CPU tasks given


def test_check_topology_compares_the_world_with_the_config(monkeypatch, capsys):
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in ("MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key)
    assert check_topology(4) is None  # not under srun
    monkeypatch.setenv("SLURM_JOB_NAME", "ettin-x")
    monkeypatch.setenv("SLURM_JOB_ID", "81234")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[017-018]")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODEID", "0")
    topology = check_topology(8, devices_per_node=4, num_nodes=2)
    assert (topology.master_addr, topology.master_port) == ("gpu017", 16234)  # Lightning's defaults
    out = capsys.readouterr().out
    assert "world size 8" in out and "rank 0/8" in out
    with pytest.raises(TopologyError, match="expects a world size of 4"):
        check_topology(4)
    with pytest.raises(TopologyError, match="trainer.devices=8"):
        check_topology(8, devices_per_node=8)


def test_ranks_agree_on_a_preemption_signal_over_a_cpu_group(monkeypatch):
    """After every step: an all-reduce of one CPU integer over a gloo group made at setup with the run's
    timeout; not Lightning's reduce_boolean_decision, whose barrier and read wait for the GPU."""
    from datetime import timedelta
    from types import SimpleNamespace

    import torch.distributed as dist

    made, reduced = [], []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: made.append(kwargs) or "cpu-group")
    monkeypatch.setattr(dist, "destroy_process_group", lambda group: made.remove(made[0]))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, group: reduced.append((tensor.device.type, group))
                        or tensor.add_(1))  # the other rank was signalled
    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(
        reduce_boolean_decision=lambda *a, **k: pytest.fail("a barrier and a GPU read at every step")))
    handler = preemption.PreemptionHandler(save_fn=lambda trainer: None, timeout=timedelta(seconds=7))
    handler.setup(trainer, None, "fit")
    assert made == [{"backend": "gloo", "timeout": timedelta(seconds=7)}]
    assert handler._any_rank_signalled(trainer) is True
    assert reduced == [("cpu", "cpu-group")]
    handler.teardown(trainer, None, "fit")
    assert made == []


def test_preemption_without_slurm_saves_at_a_step_boundary_and_stops(tmp_path, monkeypatch):
    """In one process: the signal arrives inside step 3; the save happens after that step."""
    import lightning as L

    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    saved = []

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # delivered while the step runs
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=2)

    handler = preemption.PreemptionHandler(save_fn=lambda trainer: saved.append(trainer.global_step))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=20, callbacks=[handler], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny())
    assert saved == [4] and trainer.global_step == 4  # after step index 3, then stopped
    assert handler.preempted and not handler.requeued
    assert preemption.received(signal.SIGUSR1) is None  # acted on, cleared
    # Still installed after fit: a signal between phases (or during export) is recorded, not fatal.
    assert signal.getsignal(signal.SIGUSR1) is preemption._record


def test_one_test_process_holds_the_local_cluster_at_a_time(tmp_path):
    """Two processes starting the one cluster restart its daemons under each other's jobs."""
    from slurm_cluster import LocalCluster

    first, second = LocalCluster(tmp_path), LocalCluster(tmp_path)
    first.hold()
    with pytest.raises(RuntimeError, match=f"in use by pytest process {os.getpid()}"):
        second.hold()
    first.release()
    second.hold()  # free again
    second.release()


def test_the_slurm_files_run_as_one_group_and_every_other_file_as_its_own():
    """The work units of the xdist scheduler that tests/conftest.py gives pytest-xdist."""
    import conftest

    scope = conftest.FileGroupScheduling._split_scope
    assert {scope(f"tests/{name}::test_x[a-b]") for name in conftest.SLURM_FILES} == {"slurm"}
    assert scope("tests/test_train.py::test_a") == scope("tests/test_train.py::test_b[x]") == "test_train.py"
    assert scope("tests/test_train.py::test_a") != scope("tests/test_suite.py::test_a")


# ---------------------------------------------------------------------------------------------------
# On the local cluster (2 cores in CI; the cluster declares 4 CPUs so two 2-task jobs overlap)
#
# Order matters for the wall time only: the tiny-Lightning jobs are submitted first and run while
# the ettin runs are prepared and trained; their tests come last and find them finished.


def _log(run_dir: Path) -> str:
    path = run_dir / "slurm.log"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.slow
@pytest.mark.slurm
def test_a_trivial_job_runs_through_the_template_and_appends_its_log(cluster, tmp_path):
    run_dir = tmp_path / "hello"
    program = ("import os; print('task', os.environ['SLURM_PROCID'], 'of', os.environ['SLURM_NTASKS'], "
               "'at', os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'], "
               "'threads', os.environ['OMP_NUM_THREADS'])")
    spec = JobSpec(run_name="hello", run_dir=run_dir, command=[sys.executable, "-c", program],
                   tasks_per_node=2, cpus_per_task=1)
    for _ in range(2):  # a second job of the same run appends to the same log
        state = cluster.wait(cluster.track(submit(spec)), timeout=60)
        assert state["JobState"] == "COMPLETED", (state, _log(run_dir))
    log = _log(run_dir)
    assert (run_dir / "launch.sbatch").exists()
    assert log.count("(restart 0) of run hello") == 2
    assert log.count("0: task 0 of 2 at ") == 2 and log.count("1: task 1 of 2 at ") == 2
    assert "threads 1" in log


TINY_STEPS = 30


@pytest.fixture(scope="module")
def tiny_jobs(cluster, tmp_path_factory):
    """Two jobs of tests/slurm_tiny_train.py, submitted at once and not waited for here.

    ``preempted``: 30 slow steps; a watcher thread sends the batch shell SIGUSR1 (what
    ``--signal=B:USR1@lead`` does before the time limit) once 3 steps are done.
    ``hang``: rank 1 stops answering at step 3; the collective timeout is 3 s.
    """
    root = tmp_path_factory.mktemp("tiny")
    jobs = {}
    for name, extra in [("preempted", ["--steps", str(TINY_STEPS), "--step-sleep", "0.1"]),
                        ("hang", ["--steps", "40", "--hang-rank", "1", "--hang-at-step", "3",
                                  "--timeout-s", "3"])]:
        run_dir = root / name
        spec = JobSpec(run_name=name, run_dir=run_dir, tasks_per_node=2, cpus_per_task=1,
                       command=[sys.executable, str(TINY), str(run_dir), *extra])
        jobs[name] = (cluster.track(submit(spec)), run_dir)
    job, run_dir = jobs["preempted"]
    progress = run_dir / "progress"

    def preempt() -> None:
        try:
            cluster.wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= 3, 150,
                             "3 steps")
            cluster.signal_batch(job)
        except Exception as error:  # the test reports it
            jobs["watcher_error"] = error

    watcher = threading.Thread(target=preempt, daemon=True)
    watcher.start()
    jobs["watcher"] = watcher
    return jobs


# -- ettin.train.run itself, submitted with python -m ettin.launch ----------------------------------------

ETTIN_RUN = [
    "recipe=smoke", "phase_order=[pretrain]", "pair=false", "objective=mlm", "export_at_end=false", "eval_at_end=false",
    "phases.pretrain.tokens=40_000", "phases.pretrain.checkpoint_every_tokens=10_000",
    "model.attention_output_dropout=0.0",  # dropout draws differ between 1 and 2 processes
    "trainer.log_every_steps=1", "trainer.num_workers=0",
]


def ettin_losses(run_dir: Path) -> list[tuple[float, float]]:
    with (run_dir / "logs" / "pretrain" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [(float(r["train/tokens"]), float(r["train/loss"])) for r in rows]


@pytest.fixture(scope="module")
def ettin_runs(cluster, tiny_jobs, tmp_path_factory):
    """The same short run three ways: one process here (2 micro-batches of 8 per step), 2 tasks
    uninterrupted and 2 tasks preempted mid-run (1 micro-batch of 8 per rank): global batch 16."""
    from ettin.train.config import compose
    from ettin.train.run import train

    workspace = tmp_path_factory.mktemp("ettin")
    common = [*ETTIN_RUN[1:], f"output_dir={workspace / 'runs'}", f"data_dir={workspace / 'data'}"]
    # One process, here; it also prepares the tokenizer and the data the jobs then share.
    one = compose("smoke", [*common, "run_name=one-process", "trainer.devices=1",
                            "trainer.accelerator=cpu"])
    train(one)
    jobs = {}
    for name in ("two-tasks", "requeued"):  # both at once: the cluster has room for two jobs
        job, spec, _ = launch.launch(["--cpus-per-node", "2", "--", "recipe=smoke", *common,
                                      f"run_name={name}"])
        jobs[name] = (cluster.track(job), spec.run_dir)
    job, run_dir = jobs["requeued"]
    checkpoints = run_dir / "checkpoints"
    cluster.wait_for(lambda: checkpoints.is_dir() and any(
        not p.name.startswith(".") for p in checkpoints.iterdir()), 240, "the first checkpoint",
        interval=0.1, detail=lambda: _log(run_dir)[-3000:])
    cluster.signal_batch(job)  # what --signal=B:USR1@lead does before the time limit
    states = {name: cluster.wait(job, timeout=240, states=("COMPLETED", "FAILED", "CANCELLED"))
              for name, (job, _) in jobs.items()}
    return {"one": one.run_dir, **{name: (states[name], run_dir) for name, (_, run_dir) in jobs.items()}}


def test_two_tasks_train_to_the_losses_of_one_process(ettin_runs):
    state, run_dir = ettin_runs["two-tasks"]
    log = _log(run_dir)
    assert state["JobState"] == "COMPLETED", (state, log[-4000:])
    assert "topology: job" in log and "world size 2" in log, "ettin.train.run must call check_topology"
    two, one = ettin_losses(run_dir), ettin_losses(ettin_runs["one"])
    assert len(two) == len(one) >= 30
    assert [t for t, _ in two] == [t for t, _ in one]  # same tokens per step
    worst = max(abs(a - b) for (_, a), (_, b) in zip(two, one))
    assert worst <= LOSS_ATOL, f"losses differ by up to {worst:.2e} (tolerance {LOSS_ATOL:.0e})"


def test_requeue_mid_run_resumes_and_ends_with_the_uninterrupted_loss(ettin_runs):
    from ettin.store.checkpoints import list_checkpoints, read_meta

    state, run_dir = ettin_runs["requeued"]
    log = _log(run_dir)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (state, log[-4000:])
    assert "SIGUSR1: forwarding to the tasks" in log
    # One log, appended: the preempted job, then the requeued one, which resumed in the same run dir.
    first, second = log.index("(restart 0) of run requeued"), log.index("(restart 1) of run requeued")
    assert first < log.index("requeued job") < second
    saved = re.findall(r"checkpoint (\S+)", log[first:log.index("requeued job")])[-1]  # on the signal
    assert f"resumed from {saved}" in log[second:]
    metas = [read_meta(p) for p in list_checkpoints(run_dir)]
    assert metas[-1]["phase_end"] and metas[-1]["tokens"] >= 40_000
    uninterrupted = ettin_losses(ettin_runs["two-tasks"][1])
    resumed = ettin_losses(run_dir)
    assert resumed[-1][0] == uninterrupted[-1][0]
    assert abs(resumed[-1][1] - uninterrupted[-1][1]) <= LOSS_ATOL, (resumed[-1], uninterrupted[-1])


# -- the tiny Lightning jobs: the same machinery without ettin.train.run ----------------------------------


@pytest.mark.slow
@pytest.mark.slurm
def test_preempted_tiny_lightning_job_checkpoints_requeues_and_resumes(cluster, tiny_jobs):
    """Batch shell -> srun -> every task; the handler saves at a step boundary and requeues; the
    same job resumes in the same run dir and ends with exactly the weights of a straight run."""
    sys.path.insert(0, str(TESTS))
    import slurm_tiny_train as tiny

    job, run_dir = tiny_jobs["preempted"]
    state = cluster.wait(job, timeout=240, states=("COMPLETED", "FAILED", "CANCELLED"))
    tiny_jobs["watcher"].join(timeout=1)
    assert "watcher_error" not in tiny_jobs, tiny_jobs.get("watcher_error")
    log = _log(run_dir)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (state, log)
    assert "SIGUSR1: forwarding to the tasks" in log
    resumed_at = torch.load(run_dir / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= resumed_at < TINY_STEPS
    assert f"0: checkpoint at step {resumed_at}" in log and "requeued=True" in log
    # One log, appended: the first job's lines, then the requeued job's.
    first, second = log.index("(restart 0) of run preempted"), log.index("(restart 1) of run preempted")
    assert first < log.index("requeued=True") < second < log.index(f"starting at step {resumed_at}")
    assert f"finished at step {TINY_STEPS}" in log[second:]
    final = torch.load(run_dir / "final.pt", weights_only=True)["model"]
    for name, expected in tiny.reference_weights(TINY_STEPS).items():
        torch.testing.assert_close(final[name], expected, atol=1e-5, rtol=1e-5)
    logged = sorted(int(line.split()[0]) for line in (run_dir / "losses.txt").read_text().splitlines())
    assert logged == list(range(TINY_STEPS))  # every step ran exactly once across the two jobs


@pytest.mark.slow
@pytest.mark.slurm
def test_a_rank_that_hangs_alone_does_not_hang_the_job(cluster, tiny_jobs):
    """Rank 1 stops answering; rank 0's collective times out (the process-group timeout), it exits
    non-zero and srun --kill-on-bad-exit ends rank 1: the job fails in seconds instead of never."""
    job, run_dir = tiny_jobs["hang"]
    state = cluster.wait(job, timeout=240)
    log = _log(run_dir)
    assert state["JobState"] == "FAILED", (state, log[-3000:])
    assert "rank 1 hangs alone at step 3" in log and "Timed out" in log
