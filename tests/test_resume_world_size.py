"""Resuming on a different number of processes (DDP on CPU with gloo, 1 <-> 2) with the same global
batch continues the same data order and the same losses; FSDP (trainer.strategy=fsdp) trains as DDP
does (also with packed micro-batches) and its checkpoints load on any world size and strategy, and
the other way round.

Dropout is off: its random draws are per rank, so they cannot match across world sizes (on a
changed world size the dropout RNG is reseeded, and the log says so). What remains differs only in
the order of floating-point sums (gradient all-reduce vs accumulation): LOSS_ATOL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ettin.store.checkpoints import list_checkpoints, read_meta
from ettin.train.config import compose
from ettin.train.run import train

from test_train import losses

LOSS_ATOL = 1e-4
RUN = [
    "phase_order=[pretrain]", "pair=false", "objective=mlm", "export_at_end=false", "eval_at_end=false",
    "phases.pretrain.tokens=60_000", "phases.pretrain.checkpoint_every_tokens=15_000",
    "keep_last_checkpoints=10", "model.attention_output_dropout=0.0",
    "trainer.log_every_steps=1", "trainer.num_workers=0", "trainer.accelerator=cpu",
]


def train_in_two_processes(workspace: Path, *overrides: str) -> None:
    """``python -m ettin.train`` with trainer.devices=2: Lightning starts the second process."""
    command = [sys.executable, "-m", "ettin.train", "recipe=smoke", *RUN, *args(workspace),
               "trainer.devices=2", *overrides]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def args(workspace: Path) -> list[str]:
    return [f"output_dir={workspace / 'runs'}", f"data_dir={workspace / 'data'}"]


def train_in_one_process(workspace: Path, *overrides: str) -> None:
    train(compose("smoke", [*RUN, *args(workspace), "trainer.devices=1", *overrides]))


def middle_checkpoint(run_dir: Path) -> Path:
    inside = [c for c in list_checkpoints(run_dir) if not read_meta(c)["phase_end"]]
    return next(c for c in inside if read_meta(c)["tokens"] >= 25_000)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    train_in_one_process(root, "run_name=one")  # also prepares the tokenizer and the data
    train_in_two_processes(root, "run_name=two")
    train_in_two_processes(root, "run_name=fsdp", "trainer.strategy=fsdp")
    # Packed micro-batches of 2 x 128 tokens vary in number per rank unless the loader evens them
    # out: FSDP's collective forwards would wait forever on a rank with fewer (here: time out).
    train_in_two_processes(root, "run_name=fsdp-packed", "trainer.strategy=fsdp", "pack_micro_batches=true",
                           "phases.pretrain.micro_batch=2", "trainer.process_group_timeout_s=120")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("run", ["two", "fsdp", "fsdp-packed"])
def test_one_and_two_processes_train_alike(workspace, run):
    one, two = losses(workspace / "runs" / "one", "pretrain"), losses(workspace / "runs" / run, "pretrain")
    assert [t for t, _ in one] == [t for t, _ in two] and len(one) >= 20
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, two)) <= LOSS_ATOL
    assert read_meta(list_checkpoints(workspace / "runs" / run)[0])["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("saved_by, resumed_on", [("two", "1"), ("one", "2"), ("fsdp", "1"),
                                                  ("one", "2-fsdp")])
def test_resume_on_another_world_size_continues_the_same_run(workspace, saved_by, resumed_on):
    source = workspace / "runs" / saved_by
    checkpoint = middle_checkpoint(source)
    saved = read_meta(checkpoint)
    assert saved["world_size"] == (1 if saved_by == "one" else 2)
    name = f"{saved_by}-then-{resumed_on}"
    shutil.rmtree(workspace / "runs" / name, ignore_errors=True)
    if resumed_on.startswith("2"):
        strategy = "fsdp" if resumed_on.endswith("fsdp") else "ddp"
        train_in_two_processes(workspace, f"run_name={name}", f"resume={checkpoint}",
                               f"trainer.strategy={strategy}")
    else:
        train_in_one_process(workspace, f"run_name={name}", f"resume={checkpoint}")

    run_dir = workspace / "runs" / name
    log = (run_dir / "train.log").read_text()
    assert f"resumed from {checkpoint}" in log
    world = int(resumed_on[0])
    assert f"world size changed ({saved['world_size']} -> {world})" in log
    expected = [(t, l) for t, l in losses(source, "pretrain") if t > saved["tokens"]]
    got = losses(run_dir, "pretrain")
    assert [t for t, _ in got] == [t for t, _ in expected] and len(got) >= 5  # same batches
    worst = max(abs(a - b) for (_, a), (_, b) in zip(got, expected))
    assert worst <= LOSS_ATOL, f"losses differ by up to {worst:.2e} (tolerance {LOSS_ATOL:.0e})"
    final = read_meta(list_checkpoints(run_dir)[-1])
    assert final["phase_end"] and final["world_size"] == world
    assert final["loader_state"] == read_meta(list_checkpoints(source)[-1])["loader_state"]
