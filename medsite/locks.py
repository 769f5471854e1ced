"""One exclusive file lock for the site's processes (no heavy imports: a restore takes it
without loading the ML stack)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path


class LockBusy(Exception):
    """Another holder kept the lock for longer than the wait."""


@contextmanager
def file_lock(path: Path, *, wait: float = 0.0):
    """Hold an exclusive ``flock`` on ``path`` (waiting up to ``wait`` seconds, else
    ``LockBusy``). Each call opens the file itself, so two threads of one process exclude
    each other as two processes do; the lock goes with the process if it dies. The file
    stays (an empty lock file), so the next holder locks the same inode."""
    import fcntl

    deadline = time.monotonic() + max(wait, 0.0)
    with open(path, "a+b") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(str(path)) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
