"""Publishing files and folders so that a reader sees the old version or the whole new one, never a
part: write aside, fsync, rename into place. The one implementation behind checkpoints, prepared data,
exports, the built-in tokenizer, the preparation executor's task folders and the run lock.

A folder is written into ``.<name>.tmp-<pid>@<host>`` beside its final place. To publish it, every
file and folder in it is fsynced, an existing version is renamed aside to ``.<name>.old-<pid>@<host>``,
the new one is renamed to ``<name>`` and the parent is fsynced; then the old one is deleted. A crash at
any point leaves the old version or the new one under ``<name>`` (or, between the two renames, the old
one aside, which :func:`clean_stale` puts back), and leftovers of dead processes are cleaned by the
next write.

The host in these names is what makes that cleaning safe on a filesystem shared by several machines:
a leftover is judged dead only from the PID table of the host that wrote it, so a writer never
deletes another node's half-written folder (whose PID means nothing here). Another host's leftovers
stay until a writer on that host cleans them (or someone deletes them). Names without a host were
written by an ettin from before hosts were recorded and are judged as this host's, as they were then.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

# The marker a finished folder holds (checkpoints, prepared data): written last, inside the folder,
# before it is published; a folder without it is never taken as finished (a copy made with other
# tools, a folder from before atomic publishing).
COMPLETE = "COMPLETE"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:@(?P<host>[^/]+))?$")


def this_host() -> str:
    """This machine's name as it appears in temporary names and locks (filename-safe)."""
    import socket

    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())


def _leftover_name(final: Path, kind: str) -> Path:
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}@{this_host()}")


def is_complete(folder: Path | str) -> bool:
    return (Path(folder) / COMPLETE).is_file()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        # Some filesystems (certain network and FUSE mounts) cannot fsync a directory; files must.
        if not (path.is_dir() and error.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (directories after their contents)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(directory) / name
            if not path.is_symlink():
                fsync_path(path)
        fsync_path(Path(directory))


def temp_path(final: Path) -> Path:
    """Where ``final`` is written before it is published (hidden: listings skip dot names)."""
    return _leftover_name(final, "tmp")


def clean_stale(parent: Path, *, restorable: Callable[[Path], bool] = lambda path: True) -> None:
    """Delete what interrupted writes of dead processes of this host left in ``parent``. A previous
    version that was moved aside (``.<name>.old-<pid>@<host>``) and whose replacement never landed is
    put back, if ``restorable(path)`` says it is whole."""
    if not parent.is_dir():
        return
    here = this_host()
    for stale in sorted(parent.iterdir()):
        found = _LEFTOVER.match(stale.name)
        if not found or found["host"] not in (None, here):  # another node's: not our PIDs to judge
            continue
        if pid_alive(int(found["pid"])) and int(found["pid"]) != os.getpid():
            continue
        final = parent / found["name"]
        if found["kind"] == "old" and not final.exists() and restorable(stale):
            os.replace(stale, final)
            continue
        _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(temp: Path, final: Path) -> Path:
    """Put the finished ``temp`` (file or folder) at ``final`` atomically, replacing what was there."""
    temp, final = Path(temp), Path(final)
    if temp.is_dir():
        fsync_tree(temp)
    else:
        fsync_path(temp)
    old: Optional[Path] = None
    if final.is_dir():  # a folder cannot be renamed onto a non-empty one: move the old one aside
        old = _leftover_name(final, "old")
        os.replace(final, old)
    try:
        os.replace(temp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    fsync_path(final.parent)
    if old is not None:
        _remove(old)
    return final


@contextlib.contextmanager
def publishing(final: Path | str) -> Iterator[Path]:
    """Where to write ``final``'s contents (a path that does not exist yet: the block creates it),
    published at ``final`` when the block ends without an error and removed when it raises
    (``final`` is then untouched)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final.parent)
    temp = temp_path(final)
    _remove(temp)
    try:
        yield temp
        publish(temp, final)
    finally:
        _remove(temp)


def write_text(path: Path | str, text: str) -> Path:
    """Replace the file ``path`` with ``text`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path(path)
    temp.write_text(text)
    return publish(temp, path)


def create_exclusive(path: Path | str, text: str) -> bool:
    """Create ``path`` holding ``text`` only if it does not exist, in one step (a hard link of a
    finished temporary file): no reader ever sees it empty. False if it already exists.

    link() is atomic on local filesystems and on NFS (where O_CREAT|O_EXCL was not, before NFSv3); a
    retransmitted NFS LINK request can report EEXIST for a link it made, so on EEXIST the temporary
    file's link count decides (open(2), O_EXCL)."""
    path = Path(path)
    temp = temp_path(path)
    temp.write_text(text)
    fsync_path(temp)
    try:
        try:
            os.link(temp, path)
        except FileExistsError:
            if os.stat(temp).st_nlink != 2:
                return False
    finally:
        temp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return True
