"""ettin.store: the one atomic publish every writer uses, and the run directory that names every path."""

import os
import subprocess
import sys
import textwrap

import pytest

from ettin.store.fs import clean_stale, create_exclusive, publish, publishing, temp_path, write_text
from ettin.store.rundir import RunDir


def _folder(path, text):
    path.mkdir(parents=True)
    (path / "file").write_text(text)
    return path


def test_publish_replaces_a_folder_whole(tmp_path):
    final = _folder(tmp_path / "out", "old")
    (final / "only-old").write_text("x")
    publish(_folder(tmp_path / "new", "new"), final)
    assert (final / "file").read_text() == "new" and not (final / "only-old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left aside


def test_a_failing_block_leaves_the_previous_version_and_no_leftovers(tmp_path):
    final = _folder(tmp_path / "out", "old")
    with pytest.raises(RuntimeError):
        with publishing(final) as temp:
            _folder(temp, "half")
            raise RuntimeError("killed mid-write")
    assert (final / "file").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_crash_between_the_two_renames_is_undone_by_the_next_writer(tmp_path):
    """A process dies after moving the old version aside and before renaming the new one in: the
    next write (or any clean_stale) puts the old one back."""
    final = _folder(tmp_path / "out", "old")
    code = textwrap.dedent(f"""
        import os, pathlib
        from ettin.store import fs
        final = pathlib.Path({str(final)!r})
        new = final.with_name("new"); new.mkdir(); (new / "file").write_text("new")
        real = os.replace
        def dying(src, dst):
            if pathlib.Path(src) == new:
                os._exit(9)
            real(src, dst)
        fs.os.replace = dying
        fs.publish(new, final)
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert not final.exists() and [p.name for p in tmp_path.glob(".out.old-*")]
    clean_stale(tmp_path)
    assert (final / "file").read_text() == "old" and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_publish_syncs_the_new_version_before_renaming_it_into_place(tmp_path, monkeypatch, kind):
    """A rename that reaches the disk before the data would, after a power cut, leave a published
    name pointing at empty or partial files: every fsync of the new version precedes the rename."""
    from ettin.store import fs

    temp = tmp_path / "new"
    if kind == "folder":
        _folder(temp, "new")
    else:
        temp.write_text("new")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fs.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(fs.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    publish(temp, tmp_path / "out")
    rename = events.index("replace")
    assert events[:rename] == ["fsync"] * (2 if kind == "folder" else 1), events
    assert events[rename + 1:] == ["fsync"], events  # the parent, so the rename itself is durable


def test_what_a_live_process_is_writing_is_left_alone(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _folder(tmp_path / f".a.tmp-{holder.pid}", "writing")
        dead = _folder(tmp_path / ".b.tmp-999999999", "left by a crash")
        clean_stale(tmp_path)
        assert live.exists() and not dead.exists()
    finally:
        holder.kill()
        holder.wait()


def test_files_are_written_whole_and_created_only_once(tmp_path):
    path = tmp_path / "metrics.csv"
    write_text(path, "a\n")
    write_text(path, "a\nb\n")
    assert path.read_text() == "a\nb\n" and not temp_path(path).exists()
    lock = tmp_path / "LOCK"
    assert create_exclusive(lock, '{"pid": 1}') and lock.read_text() == '{"pid": 1}'
    assert not create_exclusive(lock, '{"pid": 2}') and lock.read_text() == '{"pid": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK", "metrics.csv"]


def test_the_run_directory_names_every_path_and_knows_a_run(tmp_path):
    run = RunDir(tmp_path / "run")
    assert not RunDir.is_run(run.path) and run.holds_a_run() is None
    assert run.metrics("decay") == run.path / "logs" / "decay" / "metrics.csv"
    assert run.checkpoint("pretrain", 3, 1234).name == "pretrain-step0000003-tok000000000001234"
    assert (run.export(), run.export("extension")) == (run.path / "hf", run.path / "hf-extension")
    run.metrics("pretrain").parent.mkdir(parents=True)
    run.metrics("pretrain").write_text("step\n")
    assert run.holds_a_run() == run.metrics("pretrain")
    run.config.write_text("run_name: run\n")
    assert RunDir.is_run(run.path)
    assert RunDir.of_export(run.export("decay")) == run and RunDir.of_export(tmp_path / "hf") is None
    assert os.fspath(run.lock).endswith("run/LOCK")
