"""Writing outputs so that a crash never leaves a half-written result under the final name."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from linmu_cli.errors import LinmuError


def check_output_dir(out: Path, force: bool) -> None:
    """Fail before any work when OUT holds something and --force was not given."""
    if out.exists() and not out.is_dir():
        raise LinmuError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LinmuError(f"{out} exists and is not empty; pass --force to replace it")


def check_writable(out: Path) -> None:
    """Fail before loading anything when OUT's parent (or the nearest existing ancestor) cannot be written."""
    parent = Path(out).expanduser().absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LinmuError(f"cannot write {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LinmuError(f"cannot write {out}: {parent} is not writable; choose a place you may write to")
    try:  # os.access says yes for root on a read-only mount: try it
        probe = parent / f".linmu-write-test-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise LinmuError(
            f"cannot write {out}: {parent}: {exc.strerror or exc}; choose a writable place"
        ) from None


@contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out` by rename, on error it is removed."""
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


TEMP_MARKERS = (".tmp-", ".old-")


def remove_stale_temporaries(directory: Path, any_pid: bool = False) -> list[Path]:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` entries (atomic_directory's and checkpoints' temporaries) whose
    process is gone; with `any_pid` (the caller holds an exclusive lock on `directory`) every one of them.

    A SIGKILL between the two renames of atomic_directory leaves `.NAME.old-PID` (the previous result) and a
    complete `.NAME.tmp-PID` with NAME missing: the complete one is put in place instead of being deleted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if not name.startswith(".") or not any(m in name for m in TEMP_MARKERS):
            continue
        pid_text = name.rpartition("-")[2]
        if not pid_text.isdigit() or (not any_pid and _pid_alive(int(pid_text))):
            continue
        if ".old-" in name:
            target = directory / name[1:].rpartition(".old-")[0]
            done = directory / f".{target.name}.tmp-{pid_text}"
            if not target.exists() and done.is_dir():
                done.rename(target)
        if entry.exists() or entry.is_symlink():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed) while the block runs; a second holder fails at once
    with a LinmuError naming the process (pid, host, start time) that holds it. The file's inode is re-checked
    after locking, so a lock file removed by its previous holder is never shared by two processes."""
    import fcntl
    import socket
    import time

    path = Path(path)
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise LinmuError(
                f"{what} is in use by another linmu process ({holder}); wait for it to finish or stop it"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise LinmuError(f"could not lock {path}: it keeps being replaced")
    try:
        info = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode() + b"\n", 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock
