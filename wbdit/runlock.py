"""One writer per run directory: an OS file lock (``fcntl.flock``) on ``out_dir/train.lock``.

The kernel drops the lock when its holder exits, however it exits (SIGKILL included), so a
lock is never stale; the file names its holder (pid and host) for the message a second
writer gets, and is deleted when the holder releases it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import warnings
from pathlib import Path
from typing import Iterator

LOCK = "train.lock"


class RunLockedError(OSError):
    """Another process is writing the run directory."""


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the writer lock of ``out_dir`` (created if needed) for the block.

    Raises ``RunLockedError`` at once if another process holds it. On a filesystem without
    locks (some NFS and Lustre mounts) it warns and runs unlocked. A directory it created is
    removed again if the block leaves it empty.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK
    fd = _acquire(path)
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        os.unlink(path)  # before unlocking: whoever locks the old file next sees it is gone (_acquire)
        os.close(fd)
        if created and not any(out_dir.iterdir()):  # a run that failed before writing anything leaves no trace
            out_dir.rmdir()


def _acquire(path: Path) -> int | None:
    """A descriptor of ``path`` holding its exclusive lock; None where the filesystem has no locks."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"{path.parent} is being written by {holder} (lock {path}); wait for it to "
                "finish, or train into another directory"
            ) from None
        except OSError as exc:
            os.close(fd)
            warnings.warn(
                f"{path}: this filesystem cannot lock files ({exc}); nothing stops a second "
                "process from writing this run directory at the same time",
                stacklevel=4,
            )
            return None
        # The holder deletes the file as it releases the lock: if the file we locked is not (or
        # no longer) the one at ``path``, a third process may be locking a new one; start over.
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)
