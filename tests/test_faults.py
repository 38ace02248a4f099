"""Faults a user runs into, each ending with a clear message, a non-zero exit and nothing lost:
divergence, corrupted checkpoints, a second process in the same run, resume=never on an existing
run, missing data of a later phase, unknown keys."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ettin.store.checkpoints import (CheckpointError, list_checkpoints, load_weights, read_meta,
                                     safe_torch_load, verify_checkpoint, write_checkpoint)
from ettin.train.checkpoint import Checkpointer
from ettin.store.fs import this_host
from ettin.store.rundir import RunLock, RunLockedError
from ettin.train.config import ConfigError, compose
from ettin.train_command import dry_run_report
from ettin.train_command import main

SHORT = ["pair=false", "objective=clm", "phase_order=[pretrain]", "phases.pretrain.tokens=12_000",
         "phases.pretrain.warmup_tokens=2_000",
         "phases.pretrain.checkpoint_every_tokens=4_000", "phases.pretrain.val_every_tokens=0",
         "trainer.num_workers=0", "trainer.log_every_steps=1", "eval_at_end=false",
         "export_at_end=false"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults-data")


def args(tmp_path: Path, data_dir: Path, *extra: str) -> list[str]:
    return [f"output_dir={tmp_path}", f"data_dir={data_dir}", "run_name=run", *SHORT, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> Path:
    """One finished short run; tests get a copy of it."""
    root = tmp_path_factory.mktemp("faults-trained")
    assert main(args(root, data_dir)) == 0
    return root / "run"


def finished_run(tmp_path, trained) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
def test_a_diverging_run_stops_with_an_error_and_keeps_its_finite_checkpoints(tmp_path, data_dir, trained,
                                                                            capsys):
    run = finished_run(tmp_path, trained)
    good = [p.name for p in list_checkpoints(run)]
    # Continue into another phase with an absurd LR: the loss turns NaN within a few steps.
    code = main(args(tmp_path, data_dir, "phase_order=[pretrain,extension]", "optim.lr=1e6",
                     "phases.extension.tokens=40_000", "phases.extension.checkpoint_every_tokens=500"))
    assert code == 3
    assert "NaN/inf" in capsys.readouterr().err
    kept = list_checkpoints(run)
    assert [p.name for p in kept if p.name.startswith("pretrain")] == good  # nothing pruned
    for checkpoint in kept:  # and nothing non-finite was written
        assert all(torch.isfinite(t).all() for t in load_weights(checkpoint).values()), checkpoint


def test_a_checkpoint_due_before_the_next_log_step_stops_on_nan_without_saving(tmp_path, data_dir, trained,
                                                                             capsys):
    run = finished_run(tmp_path, trained)
    # No log step in the extension phase: the check before the first interval checkpoint is the one.
    code = main(args(tmp_path, data_dir, "phase_order=[pretrain,extension]", "optim.lr=1e6",
                     "trainer.log_every_steps=100000", "phases.extension.tokens=40_000",
                     "phases.extension.checkpoint_every_tokens=500"))
    assert code == 3
    assert "found before the interval checkpoint at step" in capsys.readouterr().err
    for checkpoint in list_checkpoints(run):  # the check kept every non-finite state out
        assert all(torch.isfinite(t).all() for t in load_weights(checkpoint).values()), checkpoint


def test_an_inf_gradient_on_a_step_that_is_not_logged_stops_at_the_next_check():
    from ettin.model.config import model_config
    from ettin.model.modernbert import ModernBert
    from ettin.train.step import NonFiniteLossError, StepSettings, TrainStep

    torch.manual_seed(0)
    model = ModernBert(model_config("tiny", vocab_size=64))
    # The loss stays finite; only the gradient (and so its norm) is not.
    model.decoder.bias.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     StepSettings(lr=0.1, lr_multiplier=lambda tokens: 1.0, peak_lr=0.1))
    ids = torch.randint(4, 64, (12,))
    batch = {"input_ids": ids, "labels": ids, "cu_seqlens": torch.tensor([0, 12], dtype=torch.int32),
             "max_seqlen": 12}
    # A step that logs nothing: the flag is still raised on the device, read at the check.
    result = step([batch], tokens_before=0, targets=[12], rows=[1])
    assert torch.isfinite(result.loss_sum) and not torch.isfinite(result.grad_norm)
    with pytest.raises(NonFiniteLossError, match="NaN/inf in step 1, found before the interval"):
        step.check_finite("the interval checkpoint", steps="step 1")


def test_an_inf_gradient_just_before_a_checkpoint_exits_3_naming_the_steps_and_the_last_good_checkpoint(
        tmp_path, data_dir, monkeypatch, capsys):
    from ettin.train.module import EttinModule

    original = EttinModule.training_step

    def inf_gradient_at_8000_tokens(self, batch, batch_idx):
        # The step that crosses the second interval checkpoint: its loss is finite, only its gradient
        # is not, and no log step reads the flag in between (log_every_steps is huge).
        if not batch.tokens_before < 8_000 <= batch.state.tokens:
            return original(self, batch, batch_idx)
        hook = self.model.decoder.bias.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        try:
            return original(self, batch, batch_idx)
        finally:
            hook.remove()

    monkeypatch.setattr(EttinModule, "training_step", inf_gradient_at_8000_tokens)
    assert main(args(tmp_path, data_dir, "trainer.log_every_steps=100000")) == 3
    err = capsys.readouterr().err
    kept = list_checkpoints(tmp_path / "run")
    assert [read_meta(p)["tokens"] < 8_000 for p in kept] == [True], kept  # the 4k one only
    assert f"The last good checkpoint is {kept[0]}" in err, err
    first_step = read_meta(kept[0])["step"] + 1
    assert f"became NaN/inf in steps {first_step} to " in err, err
    assert "interval checkpoint" in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(torch.isfinite(t).all() for t in load_weights(kept[0]).values())


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_exits_128_plus_it_with_the_checkpoint_to_resume_from(tmp_path, data_dir, signum,
                                                                            status):
    """What Slurm's time limit, timeout(1) and Ctrl-C send: a non-zero status (so `train && eval`
    stops) and one line saying where the same command resumes."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "ettin.train",
               *args(tmp_path, data_dir, "phases.pretrain.tokens=100_000_000")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not list_checkpoints(run) and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        process.send_signal(signum)
        err = process.communicate(timeout=120)[1]
    finally:
        process.kill()
    assert process.returncode == status, err
    checkpoint = list_checkpoints(run)[-1]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"stopped at [\d,]+ tokens \({signal.Signals(signum).name}, run run, phase "
                        rf"pretrain\); run the same command again to resume from {re.escape(str(checkpoint))}",
                        last), err
    assert "Traceback" not in err, err


def test_a_checkpoint_of_non_finite_weights_is_refused_and_nothing_is_written(tmp_path):
    from ettin.train.step import NonFiniteLossError

    weights = {"a": torch.zeros(3), "b": torch.tensor([1.0, float("nan")])}
    with pytest.raises(NonFiniteLossError, match=r"weights are not finite \(b hold NaN/inf\)"):
        Checkpointer(tmp_path).save(phase="pretrain", phase_index=0, kind="interval",
                                    loader_state={"step": 3, "tokens": 300}, model_state=weights,
                                    optimizer_state={}, rng_states=[], config_yaml="", meta={})
    assert list_checkpoints(tmp_path) == [] and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("override, message", [
    ("trainer.log_every_steps=0", "trainer.log_every_steps=0: must be an integer >= 1"),
    ("keep_last_checkpoints=0", "keep_last_checkpoints=0: must be >= 1"),
    ("global_batch=0", "global_batch=0: must be >= 1"),
    ("trainer.val_mask_rate=2", r"trainer.val_mask_rate=2.0: must be in \(0, 1\)"),
    ("trainer.precision=fp8", "trainer.precision='fp8'; choose one of auto, 32-true, bf16-mixed"),
    ("eval_tasks=no_such_task", "eval_tasks=no_such_task: unknown task 'no_such_task'"),
])
def test_every_option_is_checked_before_anything_runs(tmp_path, data_dir, capsys, override, message):
    pair = ["pair=true", "eval_at_end=true"] if override.startswith("eval_tasks") else []
    assert main(args(tmp_path, data_dir, *pair, override)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()  # nothing prepared, nothing trained


@pytest.mark.parametrize("override, difference", [
    ("size=micro", "size: tiny in the checkpoint, micro now"),
    ("objective=mlm", "objective of phase pretrain: clm in the checkpoint, mlm now"),
    ("model.num_hidden_layers=3", "model.num_hidden_layers: 4 in the checkpoint, 3 now"),
])
def test_resuming_as_another_model_names_the_difference(tmp_path, data_dir, trained, capsys, override,
                                                        difference):
    finished_run(tmp_path, trained)
    assert main(args(tmp_path, data_dir, override)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and difference in last and "Unexpected key" not in err, err


def test_resuming_with_a_changed_schedule_lists_it_as_a_warning(tmp_path, data_dir, trained):
    run = finished_run(tmp_path, trained)
    assert main(args(tmp_path, data_dir, "phases.pretrain.lr_scale=0.5", "optim.lr=0.01")) == 0
    warning = next(line for line in (run / "train.log").read_text().splitlines()
                   if "changed schedule" in line)
    assert "phases.pretrain.lr_scale: 1.0 in the checkpoint, 0.5 now" in warning, warning
    assert "optim.lr: " in warning and ", 0.01 now" in warning, warning


def test_weights_of_another_depth_name_the_layers_not_unexpected_keys():
    from ettin.model.config import model_config
    from ettin.model.modernbert import ModernBert
    from ettin.train.start import load_model_state

    deep = ModernBert(model_config("tiny", vocab_size=64, num_hidden_layers=3)).state_dict()
    with pytest.raises(ConfigError, match="3 layers in the weights, 2 in the model; only in the weights: "
                                          "model.layers.2"):
        load_model_state(ModernBert(model_config("tiny", vocab_size=64, num_hidden_layers=2)), deep, "x")


def test_a_full_disk_names_the_file_the_bytes_it_needed_and_the_intact_checkpoint(tmp_path, monkeypatch):
    import errno

    checkpointer = Checkpointer(tmp_path)
    weights, moments = {"w": torch.zeros(10)}, {"state": {0: {"exp_avg": torch.zeros(1000)}}}

    def save(step: int) -> Path:
        return checkpointer.save(phase="pretrain", phase_index=0, kind="interval",
                                 loader_state={"step": step, "tokens": 100 * step}, model_state=weights,
                                 optimizer_state=moments, rng_states=[], config_yaml="x: 1\n", meta={})

    intact = save(1)
    real_save = torch.save

    def full_disk(obj, file, *a, **k):
        if str(file).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, file, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as error:
        save(2)
    message = str(error.value)
    failed = tmp_path / "checkpoints" / "pretrain-step0000002-tok000000000000200" / "optimizer.pt"
    assert f"writing {failed} failed ([Errno 28] No space left on device)" in message, message
    assert "needs about 4,000 bytes" in message and f"the latest checkpoint {intact} is intact" in message
    assert list_checkpoints(tmp_path) == [intact]
    verify_checkpoint(intact)


def test_the_schedule_printed_at_start_shows_the_fresh_optimizer_warmup_of_the_phase_it_enters(
        tmp_path, data_dir, trained):
    extension = ["phases.extension.tokens=12_000", "phases.extension.checkpoint_every_tokens=4_000",
                 "phases.extension.warmup_tokens=0",
                 "phases.extension.fresh_optimizer_warmup_tokens=6_000"]
    first = [p for p in list_checkpoints(trained) if read_meta(p)["kind"] == "phase_end"][-1]
    assert main(args(tmp_path, data_dir, "phase_order=[extension]", f"init={first}", *extension)) == 0
    middle = next(p for p in list_checkpoints(tmp_path / "run") if read_meta(p)["kind"] == "interval")
    assert read_meta(middle)["fresh_optimizer"]
    # The same run resumed mid-way through its fresh phase, now the second of the phase order.
    assert main(args(tmp_path, data_dir, "phase_order=[pretrain,extension]", f"resume={middle}",
                     *extension)) == 0
    table = (tmp_path / "run" / "train.log").read_text().rsplit("schedule:", 1)[1].split(" start: ")[0]
    warmup = [line for line in table.splitlines() if "linear warmup" in line]
    assert [line.split()[0] for line in warmup] == ["pretrain", "extension"], table
    assert warmup[1].split()[1:4] == ["0", "-", "6k"], table


def test_progress_to_a_stdout_that_is_not_a_terminal_is_plain_lines_at_an_interval(
        tmp_path, data_dir, monkeypatch, capsys):
    import re

    from ettin.train import callbacks

    monkeypatch.setattr(callbacks, "PLAIN_PROGRESS_EVERY_S", 0.0)  # a line at every step
    assert main(args(tmp_path, data_dir)) == 0
    out = capsys.readouterr().out
    assert "\r" not in out
    # The total is the phase's budget, or the tokens reached when the last step overshoots it.
    lines = re.findall(r"^pretrain: (\S+)/\S+ tokens \((\S+)%\), loss (\S+), (\S+) tok/s, ETA (\S+)$",
                       out, re.MULTILINE)
    assert len(lines) >= 3, out
    assert lines[-1][1] == "100.0" and float(lines[-1][2]) > 0 and lines[-1][4] == "00:00:00"
    assert float(lines[0][1]) < 100 and lines[0][4] != "?"


def test_flipped_bytes_in_the_weights_are_found_by_the_hash_and_name_the_way_back(tmp_path, data_dir, trained,
                                                                                capsys):
    run = finished_run(tmp_path, trained)
    *earlier, latest = list_checkpoints(run)
    weights = latest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor: safetensors alone would load it
    weights.write_bytes(bytes(data))
    code = main(args(tmp_path, data_dir, "phase_order=[pretrain,extension]",
                     "phases.extension.tokens=2_000"))
    err = capsys.readouterr().err
    assert code == 2
    assert str(weights) in err and "sha256" in err and f"resume={earlier[-1]}" in err


@pytest.mark.parametrize("make, expected", [
    (lambda run: run / "nowhere", "no such file or folder"),
    (lambda run: run / "config.yaml", "is not a complete checkpoint folder"),
    (lambda run: run, "is a run directory: its latest checkpoint is resume="),
    (lambda run: garbled_meta(list_checkpoints(run)[-1]), "meta.json is not a checkpoint's meta"),
])
def test_resume_from_something_not_a_checkpoint_names_it_and_what_a_checkpoint_holds(
        tmp_path, data_dir, trained, capsys, make, expected):
    run = finished_run(tmp_path, trained)
    path = make(run)
    assert main(args(tmp_path, data_dir, f"resume={path}")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"resume={path}" in err and expected in err
    assert "Traceback" not in err
    if "meta" not in expected:
        assert "model.safetensors, optimizer.pt" in err


def garbled_meta(checkpoint: Path) -> Path:
    (checkpoint / "meta.json").write_text("{not json")
    return checkpoint


def test_unreadable_files_are_diagnosed_as_such(tmp_path):
    write_checkpoint(tmp_path, "pretrain-step0000001-tok000000000000100",
                     lambda d: (d / "model.safetensors").write_bytes(os.urandom(256)),
                     {"step": 1, "tokens": 100})
    bad = list_checkpoints(tmp_path)[0]
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_weights(bad)
    (tmp_path / "optimizer.pt").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a readable torch file: it is truncated or corrupted") as error:
        safe_torch_load(tmp_path / "optimizer.pt")
    assert "arbitrary Python objects" not in str(error.value)


@pytest.mark.slow
def test_a_second_process_in_the_same_run_is_refused_naming_the_holder(tmp_path, data_dir, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "LOCK").write_text(json.dumps(
            {"pid": holder.pid, "host": os.uname().nodename, "slurm_job_id": None}))
        assert main(args(tmp_path, data_dir)) == 2
        assert f"process {holder.pid}" in capsys.readouterr().err
        assert not (tmp_path / "run" / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # Its process is gone now: the stale lock is taken over and the run trains.
    assert main(args(tmp_path, data_dir)) == 0
    assert not (tmp_path / "run" / "LOCK").exists()  # released at the end


@pytest.mark.slow
def test_the_lock_is_exclusive_within_a_host(tmp_path):
    with RunLock(tmp_path):
        other = subprocess.run([sys.executable, "-c", (
            "import sys; from ettin.store.rundir import RunLock, RunLockedError\n"
            f"try: RunLock({str(tmp_path)!r}).acquire()\n"
            "except RunLockedError as e: print(e); sys.exit(7)")], capture_output=True, text=True)
        assert other.returncode == 7 and f"process {os.getpid()}" in other.stdout


def test_an_unreadable_lock_is_refused_not_taken_over(tmp_path):
    (tmp_path / "LOCK").write_text("")  # what a lock written in two steps looks like to a racing reader
    with pytest.raises(RunLockedError, match="cannot be read as a run lock.*delete"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / "LOCK").read_text() == ""


def test_a_racing_reader_never_sees_the_lock_empty(tmp_path):
    reader = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        f"path, empty, end = {str(tmp_path / 'LOCK')!r}, 0, time.time() + 1.5\n"
        "while time.time() < end:\n"
        "    try: text = open(path).read()\n"
        "    except FileNotFoundError: continue\n"
        "    empty += not text\n"
        "print(empty)")], stdout=subprocess.PIPE, text=True)
    while reader.poll() is None:
        RunLock(tmp_path).acquire().release()
    assert reader.stdout.read().strip() == "0"


@pytest.mark.parametrize("host, job, incarnation, taken", [
    ("here", "42", 0, False),    # another step of this job on this host, alive
    ("there", "42", 0, False),   # another step of this job on another node
    ("there", "42", 1, True),    # this job requeued onto another node: Slurm ended the first run
    ("here", "42", 1, True),     # requeued onto the same node (the old PID may be reused)
    ("there", "7", 1, False),    # another job
])
def test_a_live_lock_is_taken_over_only_by_a_later_incarnation_of_its_slurm_job(
        tmp_path, monkeypatch, host, job, incarnation, taken):
    here = this_host()
    (tmp_path / "LOCK").write_text(json.dumps({
        "pid": os.getppid(), "host": here if host == "here" else "node-elsewhere",
        "slurm_job_id": job, "slurm_restart_count": 0}))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(incarnation))
    if taken:
        lock = RunLock(tmp_path).acquire()
        assert lock.taken_over["slurm_job_id"] == job
        lock.release()
    else:
        with pytest.raises(RunLockedError, match=f"process {os.getppid()}"):
            RunLock(tmp_path).acquire()


def stale_lock(run: Path) -> Path:
    """A lock left by a process of this host that is gone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (run / "LOCK").write_text(json.dumps({"pid": int(dead), "host": this_host(), "slurm_job_id": None}))
    return run / "LOCK"


def test_two_processes_taking_over_one_stale_lock_leave_exactly_one_holder(tmp_path, monkeypatch):
    stale_lock(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # alive
    try:
        second = RunLock(tmp_path)
        monkeypatch.setattr(second, "_me", lambda: {**RunLock(tmp_path)._me(), "pid": other.pid})
        first = RunLock(tmp_path)
        # The race window: the first has read the stale lock and judged it dead; before it replaces
        # it, the second process reads the same stale lock and takes it over.
        first._before_takeover = lambda: second.acquire()
        with pytest.raises(RunLockedError, match=f"in use: process {other.pid}"):
            first.acquire()
        assert second.held and not first.held
        assert json.loads((tmp_path / "LOCK").read_text())["pid"] == other.pid
        assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK"]  # no claim or temp left
    finally:
        other.kill()
        other.wait()


def test_a_takeover_in_progress_elsewhere_is_waited_for_not_duplicated(tmp_path, monkeypatch):
    lock = stale_lock(tmp_path)
    claim = tmp_path / f".LOCK.takeover-{hashlib.sha256(lock.read_bytes()).hexdigest()[:16]}"
    claim.write_text("{}")  # another process has claimed this stale lock and is replacing it
    monkeypatch.setattr(RunLock, "_retry_s", 0.0)
    with pytest.raises(RunLockedError, match=f"{claim} exists; delete it if no process is starting"):
        RunLock(tmp_path).acquire()
    assert json.loads(lock.read_text())["host"] == this_host()  # the stale lock was left to the claimer


def test_a_lock_of_another_host_is_never_judged_by_this_hosts_pids(tmp_path):
    (tmp_path / "LOCK").write_text(json.dumps({"pid": 999_999_999, "host": "node-elsewhere",
                                               "slurm_job_id": None}))
    with pytest.raises(RunLockedError, match="process 999999999 on node-elsewhere.*delete .*LOCK"):
        RunLock(tmp_path).acquire()


def test_temporary_folders_of_another_host_are_left_alone(tmp_path):
    root = tmp_path / "checkpoints"
    elsewhere, here = root / ".x.tmp-999999999@node-elsewhere", root / f".y.tmp-999999999@{this_host()}"
    elsewhere.mkdir(parents=True)
    here.mkdir()
    write_checkpoint(tmp_path, "pretrain-step0000001-tok000000000000100",
                     lambda d: (d / "w").write_text("w"), {"step": 1, "tokens": 100})
    assert elsewhere.exists() and not here.exists()


def test_temporary_folders_of_live_processes_are_left_alone(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        root = tmp_path / "checkpoints"
        live, dead = root / f".x.tmp-{holder.pid}", root / ".y.tmp-999999999"
        live.mkdir(parents=True)
        dead.mkdir()
        write_checkpoint(tmp_path, "pretrain-step0000001-tok000000000000100",
                         lambda d: (d / "w").write_text("w"), {"step": 1, "tokens": 100})
        assert live.exists() and not dead.exists()
    finally:
        holder.kill()
        holder.wait()


def test_resume_never_refuses_an_existing_run_and_leaves_it_untouched(tmp_path, data_dir, trained, capsys):
    run = finished_run(tmp_path, trained)
    before = sorted(p.name for p in list_checkpoints(run))
    metrics = (run / "logs" / "pretrain" / "metrics.csv").read_text()
    assert main(args(tmp_path, data_dir, "resume=never")) == 2
    assert "resume=never" in capsys.readouterr().err
    assert sorted(p.name for p in list_checkpoints(run)) == before
    assert (run / "logs" / "pretrain" / "metrics.csv").read_text() == metrics


def test_missing_data_of_a_later_phase_fails_before_the_first_step(tmp_path, data_dir, capsys):
    code = main(args(tmp_path, data_dir, "phase_order=[pretrain,extension]",
                     f"data.extension=[{{path: {tmp_path / 'nowhere'}}}]"))
    assert code == 2
    assert "data of phase extension" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dry_run_reports_missing_data(tmp_path):
    report = dry_run_report(compose("decoder_17m", [f"data.pretrain=[{{path: {tmp_path / 'none'}}}]"]))
    assert f"data pretrain: {tmp_path / 'none'}: MISSING" in report


@pytest.mark.parametrize("override, key", [
    ("+optim.lrr=1e-3", "lrr"), ("+trainer.num_worker=0", "num_worker"),
    ("phases.extension.tokens=${size:extenson_tokens}", "extenson_tokens"),
])
def test_unknown_keys_fail_also_when_added_with_plus(override, key):
    with pytest.raises(ConfigError, match=key):
        compose("decoder_1b", [override])


def test_retention_keeps_interval_checkpoints_and_prunes_extra_saves(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep_interval=True, keep_last=1)
    state = {"w": torch.zeros(2)}
    for step, kind in enumerate(["interval", "preemption", "interval", "preemption", "phase_end"], 1):
        checkpointer.save(phase="pretrain", phase_index=0, kind=kind,
                          loader_state={"step": step, "samples": step, "tokens": step * 10},
                          model_state=state, optimizer_state={}, rng_states=[], config_yaml="",
                          meta={})
    kinds = [read_meta(p)["kind"] for p in checkpointer.list()]
    assert kinds == ["interval", "interval", "phase_end"]
    assert Checkpointer(tmp_path).load(checkpointer.latest()).meta["kind"] == "phase_end"


def test_weights_of_another_shape_name_the_tensor_both_shapes_and_the_fix():
    from ettin.model.config import model_config
    from ettin.model.modernbert import ModernBert
    from ettin.train.start import load_model_state

    model = ModernBert(model_config("tiny", vocab_size=512))
    other = ModernBert(model_config("tiny", vocab_size=640)).state_dict()
    with pytest.raises(ConfigError, match=r"tok_embeddings.weight has shape \(640, 64\) in the weights "
                                          r"but \(512, 64\) in the model; .*Set model.vocab_size=640"):
        load_model_state(model, other, "a test")


def test_the_data_digest_observed_in_training_survives_a_resume_and_matches_the_other_objective(
        tmp_path, data_dir, trained):
    def digests(run: Path) -> list[tuple[int, str]]:
        return [(read_meta(p)["tokens"], read_meta(p)["loader_state"]["data_digest"])
                for p in list_checkpoints(run)]

    original = digests(trained)
    assert len(original) >= 3 and len({d for _, d in original}) == len(original)
    # Resumed from its first interval checkpoint: the digest continues to the same phase end.
    run = finished_run(tmp_path / "resumed", trained)
    for later in list_checkpoints(run)[1:]:
        shutil.rmtree(later)
    assert main(args(tmp_path / "resumed", data_dir)) == 0
    assert digests(run) == original
    # An encoder on the same data is given the same rows (its rows close with [SEP]; not data).
    assert main(args(tmp_path / "encoder", data_dir, "objective=mlm")) == 0
    assert digests(tmp_path / "encoder" / "run") == original


GOOD_ROWS = "step,train/loss\n1,5.0\n2,4.5\n3,4.0\n4,3.5\n"


@pytest.mark.parametrize("content", [
    b"1,5.0\n2,4.5\n",                      # its header line lost
    b"step,train/loss\n1,5.0\n\x00\x00\xff\xfe\x00garbage\n",  # binary content after a crash
    b"\xff\xfe\x00\x01",                       # not text at all
])
def test_a_damaged_metrics_csv_is_moved_aside_whole_with_a_warning(tmp_path, ettin_log, content):
    from ettin.train.loggers import MetricsCSV

    path = tmp_path / "metrics.csv"
    path.write_bytes(content)
    MetricsCSV(path, ["train/loss"], resume_step=2).log_metrics({"train/loss": 3.0}, step=3)
    [aside] = tmp_path.glob("metrics.damaged-*.csv")
    assert aside.read_bytes() == content  # every earlier row kept, byte for byte
    assert path.read_text() == "step,train/loss\n3,3.0\n"
    warning = next(r.getMessage() for r in ettin_log.records if "moved aside" in r.getMessage())
    assert str(path) in warning and str(aside) in warning, warning


def test_a_good_metrics_csv_keeps_every_row_up_to_the_resume_step(tmp_path):
    from ettin.train.loggers import MetricsCSV

    path = tmp_path / "metrics.csv"
    path.write_text(GOOD_ROWS)
    MetricsCSV(path, ["train/loss"], resume_step=3).log_metrics({"train/loss": 3.9}, step=4)
    assert path.read_text() == "step,train/loss\n1,5.0\n2,4.5\n3,4.0\n4,3.9\n"
    assert not list(tmp_path.glob("metrics.damaged-*"))


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: wandb's LevelDB-style log (a 7-byte file header, 32 KiB
    blocks of chunks, each with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle /
    4 last) of wandb_internal_pb2.Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, records, chunk, block = path.read_bytes(), [], b"", 32768
    offset = 7
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        length, kind = int.from_bytes(data[offset + 4:offset + 6], "little"), data[offset + 6]
        if kind == 0 and length == 0:
            break
        chunk += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_wandb_offline_keeps_one_run_with_the_metrics_of_metrics_csv_across_a_resume(
        tmp_path, data_dir, trained, monkeypatch):
    import csv

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_args = ["logging.wandb=true", "logging.wandb_mode=offline"]
    assert main(args(tmp_path, data_dir, *wandb_args)) == 0
    run = tmp_path / "run"
    for later in list_checkpoints(run)[1:]:  # as if it crashed after its first checkpoint
        shutil.rmtree(later)
    assert main(args(tmp_path, data_dir, *wandb_args)) == 0
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2, files  # one per training (both in this process), the second resumed
    ids, losses = set(), {}
    for number, path in enumerate(files):
        steps = []
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                if "train/loss" in items:
                    steps.append(int(items["trainer/global_step"]))
                    losses[steps[-1]] = items["train/loss"]  # a resumed run redoes later steps
        assert len(steps) == len(set(steps)), (path, steps)
        if number:  # the resumed run logged the steps after its checkpoint, and only those
            assert steps[0] == read_meta(list_checkpoints(run)[0])["step"] + 1, steps
    assert ids == {"run"}
    with (run / "logs" / "pretrain" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["train/loss"]]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps))
    assert losses == {int(r["step"]): pytest.approx(float(r["train/loss"]), rel=1e-6) for r in rows}
