"""Every score knows what it was computed from: eval.json's provenance, the rule for reusing a stored
score, a damaged eval.json, the atomic write, and stopping an evaluation or a suite (Ctrl-C, SIGTERM).

The runs are tiny run folders with one real checkpoint (tests/test_export.py's make_run); evaluation
runs the offline cloze task at 4 examples."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ettin.data.tokenizer import train_tokenizer
from ettin.evaluation import evaluate
from ettin.evaluation.provenance import why_not_reused
from ettin.store.checkpoints import checkpoint_identity

TEXTS = [" ".join("alpha beta gamma delta module function class return value".split()[(i + j) % 9]
                  for j in range(10)) + "." for i in range(100)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(TEXTS, 320, folder)
    return folder


def train(run: Path, tokenizer: Path, seed: int) -> Path:
    """A run folder whose one checkpoint holds weights that differ with ``seed`` (a training stand-in:
    another learning rate gives other weights under the same checkpoint name)."""
    from test_export import make_run

    from ettin.store.checkpoints import load_weights, read_meta, save_weights, write_checkpoint

    shutil.rmtree(run, ignore_errors=True)
    make_run(run, tokenizer, objective="mlm")
    checkpoint = run / "checkpoints" / "pretrain-step0000010"
    state = {k: v * (1 + 0.01 * seed) for k, v in load_weights(checkpoint).items()}
    meta = {k: v for k, v in read_meta(checkpoint).items() if k != "sha256"}
    write_checkpoint(run, checkpoint.name, lambda folder: save_weights(state, folder), meta)
    return run


def cloze(run: Path, out: Path, **kwargs) -> tuple[dict, str]:
    console = io.StringIO()
    report = evaluate([run], tasks="smoke_cloze", out=out, limit=4, console=console, **kwargs)
    return report, console.getvalue()


def test_a_score_records_the_weights_tokenizer_checkpoint_settings_and_versions(tmp_path, tokenizer):
    import transformers
    from transformers import AutoTokenizer

    from ettin.data.tokenizer import tokenizer_fingerprint

    run = train(tmp_path / "run", tokenizer, seed=1)
    report, _ = cloze(run, tmp_path / "eval")
    provenance = report["models"]["run"]["tasks"]["smoke_cloze"]["provenance"]
    assert provenance["weights_sha256"] == hashlib.sha256((run / "hf" / "model.safetensors").read_bytes()).hexdigest()
    assert provenance["tokenizer"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tokenizer))
    checkpoint = run / "checkpoints" / "pretrain-step0000010"
    assert provenance["checkpoint"] == {"run": "run", "name": checkpoint.name, "phase": "pretrain", "step": 10,
                                        "tokens": 1000, "weights_sha256": hashlib.sha256(
                                            (checkpoint / "model.safetensors").read_bytes()).hexdigest()}
    assert provenance["task"] == {"limit": 4, "few_shot": 0, "seed": 0, "split": "test", "dataset_revisions": {}}
    assert provenance["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert provenance["versions"]["transformers"] == transformers.__version__
    assert set(provenance["versions"]) == {"ettin", "torch", "transformers", "lm_eval"}
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == report


def test_a_retrained_run_is_evaluated_again_and_says_why(tmp_path, tokenizer):
    """The issue's scenario: train, delete the run, train it again (other weights, same checkpoint
    names): the stored score is not reused; the same weights again are."""
    run = train(tmp_path / "run", tokenizer, seed=1)
    first, _ = cloze(run, tmp_path / "eval")
    again, printed = cloze(run, tmp_path / "eval")
    assert "run  smoke_cloze: already in eval.json" in printed
    assert again["models"]["run"]["tasks"] == first["models"]["run"]["tasks"]
    train(run, tokenizer, seed=2)
    retrained, printed = cloze(run, tmp_path / "eval")
    old, new = (r["models"]["run"]["tasks"]["smoke_cloze"]["provenance"] for r in (first, retrained))
    assert old["weights_sha256"] != new["weights_sha256"]
    assert f"run  smoke_cloze: evaluated again: weights_sha256 changed ({old['weights_sha256'][:12]} -> " \
           f"{new['weights_sha256'][:12]})" in printed
    assert new["checkpoint"] == {"run": "run", **checkpoint_identity(run / "checkpoints" / "pretrain-step0000010")}


def test_a_run_whose_export_is_of_another_checkpoint_is_exported_again(tmp_path, tokenizer):
    """RUN/hf left from before a retraining (the run folder kept, its checkpoints replaced) is not
    evaluated as the run."""
    run = train(tmp_path / "run", tokenizer, seed=1)
    cloze(run, tmp_path / "eval")
    stale_export = (run / "hf" / "model.safetensors").read_bytes()
    shutil.rmtree(run / "checkpoints")
    hf = run / "hf"
    train(tmp_path / "other", tokenizer, seed=2)
    shutil.copytree(tmp_path / "other" / "checkpoints", run / "checkpoints")
    assert (hf / "config.json").exists()
    report, printed = cloze(run, tmp_path / "eval")
    assert (hf / "model.safetensors").read_bytes() != stale_export
    assert "evaluated again: weights_sha256 changed" in printed


@pytest.mark.parametrize("field, value, expected", [
    (("weights_sha256",), "b" * 64, "weights_sha256 changed (aaaaaaaaaaaa -> bbbbbbbbbbbb)"),
    (("tokenizer",), "t2", "tokenizer changed (t1 -> t2)"),
    (("checkpoint", "name"), "pretrain-step0000020", "checkpoint.name changed (pretrain-step0000010 -> "
                                                     "pretrain-step0000020)"),
    (("checkpoint", "tokens"), 2000, "checkpoint.tokens changed (1000 -> 2000)"),
    (("task", "limit"), 8, "task.limit changed (4 -> 8)"),
    (("task", "few_shot"), 5, "task.few_shot changed (0 -> 5)"),
    (("task", "seed"), 1, "task.seed changed (0 -> 1)"),
    (("task", "split"), "validation", "task.split changed (test -> validation)"),
    (("task", "dataset_revisions", "x"), "rev2", "task.dataset_revisions.x changed (rev1 -> rev2)"),
    (("versions", "lm_eval"), "0.5", "versions.lm_eval changed (0.4.9 -> 0.5)"),
    (("versions", "ettin"), "0.2.0", "versions.ettin changed (0.1.0 -> 0.2.0)"),
])
def test_a_stored_score_is_reused_only_when_every_field_matches(field, value, expected):
    stored = {"weights_sha256": "a" * 64, "tokenizer": "t1",
              "checkpoint": {"name": "pretrain-step0000010", "tokens": 1000},
              "task": {"limit": 4, "few_shot": 0, "seed": 0, "split": "test", "dataset_revisions": {"x": "rev1"}},
              "versions": {"ettin": "0.1.0", "lm_eval": "0.4.9"}}
    wanted = json.loads(json.dumps(stored))
    assert why_not_reused({"score": 1.0, "provenance": stored}, wanted) is None
    place = wanted
    for key in field[:-1]:
        place = place[key]
    place[field[-1]] = value
    assert why_not_reused({"score": 1.0, "provenance": stored}, wanted) == expected
    assert why_not_reused({"score": 1.0}, wanted) == "its provenance is not recorded (scored by an older ettin)"


def test_a_damaged_eval_json_is_moved_aside_and_the_evaluation_proceeds(tmp_path, tokenizer, capsys):
    run = train(tmp_path / "run", tokenizer, seed=1)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text('{"format": "ettin-eval/1", "models": {"run": {"ta')  # truncated by a crash
    report, _ = cloze(run, out)
    err = capsys.readouterr().err
    (aside,) = out.glob("eval.json.damaged-*")
    assert f"warning: {out / 'eval.json'} is damaged (JSONDecodeError" in err and str(aside) in err
    assert aside.read_text().endswith('"ta')
    assert json.loads((out / "eval.json").read_text()) == report and report["models"]["run"]["tasks"]


def test_eval_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A crash before the new eval.json is on disk leaves the previous one whole."""
    from ettin.evaluation import _write
    from ettin.store import fs

    _write({"format": "ettin-eval/1", "models": {"a": {"tasks": {"t": {"score": 1.0}}}}}, tmp_path)
    before = (tmp_path / "eval.json").read_text()

    def crash(path):
        raise OSError("disk gone")

    monkeypatch.setattr(fs, "fsync_path", crash)
    with pytest.raises(OSError, match="disk gone"):
        _write({"format": "ettin-eval/1", "models": {"a": {"tasks": {"t": {"score": 2.0}}}, "b": {}}}, tmp_path)
    assert (tmp_path / "eval.json").read_text() == before


# ------------------------------------------------------------------------------------------------
# Stopping


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_evaluation_says_so_in_one_line_and_keeps_its_finished_scores(tmp_path, tokenizer, monkeypatch,
                                                                                 capsys, signum, status):
    """The signal arrives during the second task; the first task's score is in eval.json and the same
    command again reuses it."""
    import ettin.evaluation as evaluation
    from ettin.evaluation.cli import main

    run = train(tmp_path / "run", tokenizer, seed=1)
    harness_result = evaluation._harness_result

    def stopped_in_smoke_lm(task, *args):
        if task.name == "smoke_lm":
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises here
        return harness_result(task, *args)

    monkeypatch.setattr(evaluation, "_harness_result", stopped_in_smoke_lm)
    out = tmp_path / "eval"
    command = [str(run), "--tasks", "smoke_cloze,smoke_lm", "--limit", "4", "--out", str(out)]
    assert main(command) == status
    captured = capsys.readouterr()
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
    assert captured.err.strip().splitlines() == [
        f"stopped by {name} while evaluating run on smoke_lm; run the same command again to continue (the scores "
        f"finished so far, in {out / 'eval.json'}, are reused)"]
    assert list(json.loads((out / "eval.json").read_text())["models"]["run"]["tasks"]) == ["smoke_cloze"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    monkeypatch.setattr(evaluation, "_harness_result", harness_result)
    assert main(command) == 0
    assert "run  smoke_cloze: already in eval.json" in capsys.readouterr().out


def test_a_stopped_suite_says_what_stopped_and_exits_143(tmp_path, monkeypatch, capsys):
    import ettin.suite as suite_command
    from ettin.cluster.suite_members import MemberStopped

    def stopped(suite):
        raise MemberStopped("encoder_micro", tmp_path / "logs" / "encoder_micro.log", signal.SIGTERM)

    monkeypatch.setattr(suite_command, "run_local", stopped)
    assert suite_command.main(["recipe=smoke", "sizes=[micro]", f"suite_dir={tmp_path}"]) == 143
    assert capsys.readouterr().err.strip().splitlines() == [
        f"stopped by SIGTERM while training member encoder_micro (its log: {tmp_path / 'logs' / 'encoder_micro.log'}); "
        "run the same command again to continue (finished members are skipped, a stopped one resumes, finished "
        "scores are reused)"]


def test_a_stopped_suite_passes_the_signal_to_the_member_in_training_and_waits_for_it(tmp_path):
    from ettin.cluster.suite_members import run_training
    from ettin.evaluation.stopping import Terminated, sigterm_as_interrupt

    member = tmp_path / "python"
    member.write_text(f"#!/bin/sh\ntrap 'echo stopped by TERM > {tmp_path}/member; exit 143' TERM\n"
                      f"touch {tmp_path}/ready\nwhile true; do sleep 0.1; done\n")
    member.chmod(0o755)

    def terminate_when_ready():
        while not (tmp_path / "ready").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_ready, daemon=True).start()
    with sigterm_as_interrupt(), pytest.raises(Terminated):
        run_training(["recipe=smoke"], tmp_path / "member.log", python=str(member))
    assert (tmp_path / "member").read_text() == "stopped by TERM\n"


def test_the_eval_command_under_sigterm_exits_143_without_a_traceback(tmp_path):
    """The real command in its own process, stopped while it resolves its model (a module-level sleep
    stands in for a slow export)."""
    script = tmp_path / "slow_eval.py"
    script.write_text("import sys, time\nimport ettin.evaluation.models as models\n"
                      "def slow(*args, **kwargs):\n    print('resolving', flush=True)\n    time.sleep(60)\n"
                      "models.resolve_models = slow\nimport ettin.evaluation as evaluation\n"
                      "evaluation.resolve_models = slow\nfrom ettin.evaluation.cli import main\n"
                      "sys.exit(main(sys.argv[1:]))\n")
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path), "--out", str(tmp_path / "eval")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.stdout.readline() == "resolving\n"
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 143
    assert err.strip().splitlines() == [
        f"stopped by SIGTERM while preparing or saving the evaluation; run the same command again to continue "
        f"(the scores finished so far, in {tmp_path / 'eval' / 'eval.json'}, are reused)"]
