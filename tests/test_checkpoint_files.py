"""The filesystem layer of checkpoints: atomic writes, crash safety, ordering, pruning, safe loading."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ettin.store.fs import COMPLETE
from ettin.store.checkpoints import checkpoint_name
from ettin.train.checkpoint import Checkpointer
from ettin.store.checkpoints import (checkpoints_dir, latest_checkpoint, list_checkpoints,
                                     load_weights, prune_checkpoints, read_meta, safe_torch_load,
                                     write_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def _write_files(payload: str = "x"):
    def write(directory: Path) -> None:
        (directory / "data.txt").write_text(payload)
        (directory / "sub").mkdir()
        (directory / "sub" / "more.bin").write_bytes(b"\0" * 100)
        torch.save({"a": torch.arange(3)}, directory / "optimizer.pt")

    return write


def _save(run_dir, step, tokens, **meta):
    return write_checkpoint(run_dir, checkpoint_name("pretrain", step, tokens), _write_files(f"{step}"),
                            {"step": step, "tokens": tokens, **meta})


def test_write_produces_a_complete_checkpoint(tmp_path):
    path = _save(tmp_path, 3, 1234, phase="pretrain")
    assert path == tmp_path / "checkpoints" / "pretrain-step0000003-tok000000000001234"
    assert (path / COMPLETE).is_file() and (path / "sub" / "more.bin").is_file()
    meta = read_meta(path)
    hashes = meta.pop("sha256")
    assert meta == {"step": 3, "tokens": 1234, "phase": "pretrain"}
    assert hashes["sub/more.bin"] == hashlib.sha256((path / "sub" / "more.bin").read_bytes()).hexdigest()
    assert json.loads((path / "meta.json").read_text())["tokens"] == 1234
    assert latest_checkpoint(tmp_path) == path
    assert [p.name for p in checkpoints_dir(tmp_path).iterdir()] == [path.name]  # no temp left


def test_latest_is_highest_phase_then_tokens_then_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None and list_checkpoints(tmp_path) == []
    a = _save(tmp_path, 10, 5_000)
    b = _save(tmp_path, 20, 9_000)
    c = _save(tmp_path, 15, 7_000)  # written last but not the latest
    assert list_checkpoints(tmp_path) == [a, c, b] and latest_checkpoint(tmp_path) == b
    # The token clock restarts with each phase: a later phase is later whatever its tokens.
    d = write_checkpoint(tmp_path, checkpoint_name("extension", 1, 100), _write_files(),
                         {"step": 1, "tokens": 100, "phase_index": 1})
    assert latest_checkpoint(tmp_path) == d
    # Same tokens, higher step wins.
    e = write_checkpoint(tmp_path, checkpoint_name("extension", 2, 100), _write_files(),
                         {"step": 2, "tokens": 100, "phase_index": 1})
    assert latest_checkpoint(tmp_path) == e


def test_temp_and_incomplete_directories_are_ignored(tmp_path):
    good = _save(tmp_path, 1, 100)
    root = checkpoints_dir(tmp_path)
    (root / ".step-0000009-tok-000000009000.tmp-123").mkdir()
    incomplete = root / checkpoint_name("pretrain", 5, 5_000)
    incomplete.mkdir()
    (incomplete / "meta.json").write_text(json.dumps({"step": 5, "tokens": 5_000}))
    broken = root / checkpoint_name("pretrain", 6, 6_000)
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    (broken / COMPLETE).write_text("")
    assert list_checkpoints(tmp_path) == [good]


def test_exception_in_write_fn_keeps_the_previous_checkpoint(tmp_path):
    previous = _save(tmp_path, 1, 100)

    def failing(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(tmp_path, checkpoint_name("pretrain", 2, 200), failing, {"step": 2, "tokens": 200})
    assert latest_checkpoint(tmp_path) == previous
    assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == [previous.name]


def _run_child(run_dir: Path, body: str) -> int:
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        import ettin.store.checkpoints as ck
        run_dir = Path({str(run_dir)!r})
        """
    ) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], timeout=120).returncode


@pytest.mark.slow
def test_a_process_killed_inside_write_fn_leaves_the_previous_checkpoint(tmp_path):
    previous = _save(tmp_path, 1, 100)
    code = _run_child(tmp_path, """
        def write(directory):
            (directory / "model.safetensors").write_bytes(b"half of it")
            os._exit(9)  # killed mid-write: no cleanup, no exception handlers
        ck.write_checkpoint(run_dir, ck.checkpoint_name("pretrain", 2, 200), write, {"step": 2, "tokens": 200})
    """)
    assert code == 9
    root = checkpoints_dir(tmp_path)
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1  # the half-written temp directory ...
    assert latest_checkpoint(tmp_path) == previous  # ... is never taken for a checkpoint
    assert list_checkpoints(tmp_path) == [previous]
    # The next write cleans it up.
    nxt = _save(tmp_path, 3, 300)
    assert latest_checkpoint(tmp_path) == nxt
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_process_killed_after_complete_but_before_the_rename(tmp_path):
    previous = _save(tmp_path, 1, 100)
    code = _run_child(tmp_path, """
        real = os.replace
        def dying_replace(src, dst):
            os._exit(9)
        os.replace = dying_replace
        ck.write_checkpoint(run_dir, ck.checkpoint_name("pretrain", 2, 200), lambda d: (d / "w").write_text("w"),
                            {"step": 2, "tokens": 200})
    """)
    assert code == 9
    temps = [p for p in checkpoints_dir(tmp_path).iterdir() if p.name.startswith(".")]
    assert len(temps) == 1 and (temps[0] / COMPLETE).exists()  # whole, but never renamed
    assert latest_checkpoint(tmp_path) == previous


@pytest.mark.slow
def test_a_process_killed_while_replacing_a_same_named_checkpoint(tmp_path):
    first = _save(tmp_path, 2, 200)
    code = _run_child(tmp_path, """
        real = os.replace
        calls = []
        def dying_replace(src, dst):
            calls.append(src)
            if len(calls) == 2:  # the old one has been moved aside; the new one not yet in place
                os._exit(9)
            real(src, dst)
        os.replace = dying_replace
        ck.write_checkpoint(run_dir, ck.checkpoint_name("pretrain", 2, 200), lambda d: (d / "w").write_text("new"),
                            {"step": 2, "tokens": 200, "phase_end": True})
    """)
    assert code == 9
    # The next write puts the moved-aside checkpoint back before cleaning up.
    _save(tmp_path, 3, 300)
    assert first.is_dir() and (first / "data.txt").read_text() == "2"
    assert [p.name for p in list_checkpoints(tmp_path)] == [first.name, checkpoint_name("pretrain", 3, 300)]


def test_saving_the_same_name_again_replaces_it(tmp_path):
    _save(tmp_path, 2, 200)
    path = write_checkpoint(tmp_path, checkpoint_name("pretrain", 2, 200), _write_files("again"),
                            {"step": 2, "tokens": 200, "phase_end": True})
    assert (path / "data.txt").read_text() == "again" and read_meta(path)["phase_end"] is True
    assert [p.name for p in checkpoints_dir(tmp_path).iterdir()] == [path.name]


def test_bad_names_and_meta_are_refused(tmp_path):
    with pytest.raises(ValueError):
        write_checkpoint(tmp_path, "../escape", _write_files(), {"step": 1, "tokens": 1})
    with pytest.raises(ValueError):
        write_checkpoint(tmp_path, ".hidden", _write_files(), {"step": 1, "tokens": 1})
    with pytest.raises(ValueError, match="tokens"):
        write_checkpoint(tmp_path, "ok", _write_files(), {"step": 1})
    with pytest.raises(ValueError, match="meta.json"):
        write_checkpoint(tmp_path, "ok", lambda d: (d / "meta.json").write_text("{}"),
                         {"step": 1, "tokens": 1})
    assert list_checkpoints(tmp_path) == []


def test_prune_keeps_the_last_n_and_phase_ends(tmp_path):
    paths = [_save(tmp_path, s, s * 100, phase_end=s in (2, 5)) for s in range(1, 9)]
    deleted = prune_checkpoints(tmp_path, keep_last=2, keep=lambda meta: bool(meta.get("phase_end")))
    kept = list_checkpoints(tmp_path)
    assert [read_meta(p)["step"] for p in kept] == [2, 5, 7, 8]
    assert sorted(deleted) == sorted(paths[i] for i in (0, 2, 3, 5))
    assert not any(p.exists() for p in deleted)
    # Idempotent; the default keep rule is phase_end; at least one must be kept.
    assert prune_checkpoints(tmp_path, keep_last=2) == []
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, keep_last=0)


def test_prune_leaves_temp_and_incomplete_directories_alone(tmp_path):
    for s in range(1, 4):
        _save(tmp_path, s, s * 100)
    temp = checkpoints_dir(tmp_path) / ".writing.tmp-1"
    temp.mkdir()
    prune_checkpoints(tmp_path, keep_last=1, keep=lambda meta: False)
    assert temp.is_dir() and [read_meta(p)["step"] for p in list_checkpoints(tmp_path)] == [3]


def test_load_weights_through_safetensors_fills_in_the_tied_weight(tmp_path):
    from safetensors.torch import save_file

    emb = torch.randn(10, 4)
    state = {"model.embeddings.tok_embeddings.weight": emb, "decoder.bias": torch.zeros(10)}
    path = write_checkpoint(tmp_path, "w", lambda d: save_file(state, str(d / "model.safetensors")),
                            {"step": 1, "tokens": 1})
    loaded = load_weights(path)
    assert torch.equal(loaded["decoder.weight"], emb) and torch.equal(loaded["decoder.bias"], torch.zeros(10))
    assert torch.equal(load_weights(path / "model.safetensors")["decoder.weight"], emb)
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path)
    # safetensors' save_model keeps a shared tensor under either name: both ways round work.
    other = {"decoder.weight": emb, "decoder.bias": torch.zeros(10)}
    save_file(other, str(tmp_path / "other.safetensors"))
    loaded = load_weights(tmp_path / "other.safetensors")
    assert torch.equal(loaded["model.embeddings.tok_embeddings.weight"], emb)


def test_load_weights_of_a_modernbert_saved_with_save_model(tmp_path):
    from ettin.model.modernbert import ModernBert
    from safetensors.torch import save_model

    from ettin.model.config import model_config

    model = ModernBert(model_config("tiny", vocab_size=128))
    save_model(model, str(tmp_path / "model.safetensors"))
    again = ModernBert(model_config("tiny", vocab_size=128))
    again.load_state_dict(load_weights(tmp_path))  # strict: every key present
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert again.decoder.weight is again.model.embeddings.tok_embeddings.weight


class NotATensor:  # a custom class: unpickling it would mean importing and running our code
    def __init__(self):
        self.value = 1


def test_safe_torch_load_accepts_plain_state_and_refuses_custom_objects(tmp_path):
    plain = {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.98)}],
             "rng": [torch.get_rng_state()], "name": "x"}
    torch.save(plain, tmp_path / "plain.pt")
    loaded = safe_torch_load(tmp_path / "plain.pt")
    assert torch.equal(loaded["state"][0]["exp_avg"], torch.ones(2)) and loaded["name"] == "x"

    torch.save({"weights": torch.ones(2), "extra": NotATensor()}, tmp_path / "custom.pt")
    with pytest.raises(ValueError) as error:
        safe_torch_load(tmp_path / "custom.pt")
    message = str(error.value)
    assert "custom.pt" in message and "arbitrary Python objects" in message
    assert "NotATensor" in message  # names what it would have had to unpickle
    assert "safetensors" in message  # and what to do instead
