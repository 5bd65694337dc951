"""One run per output folder: an exclusive lock held for the whole run.

``fcntl.flock`` on ``<folder>/.adaprelora.lock``: the kernel releases it when the holding process
dies, however it dies, so a stale lock from a killed run is taken over safely with no pid
guessing. The file holds the holder's pid, host and start time, for the refusal message.
(flock is advisory and local: two machines writing one network folder are not excluded.)
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import TrainingError

__all__ = ["OutputLock", "LOCK_NAME", "try_lock", "is_locked"]

LOCK_NAME = ".adaprelora.lock"


def try_lock(path: str | os.PathLike) -> int | None:
    """Take the exclusive flock on ``path`` (created if missing) without waiting: the open file
    descriptor while held (closing it releases the lock; so does the process's death), or None
    when another process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def is_locked(path: str | os.PathLike) -> bool:
    """Whether a live process holds the flock on ``path`` (probed by taking it and giving it back)."""
    if not Path(path).exists():
        return False
    fd = try_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False


class OutputLock:
    """``with OutputLock(folder):`` holds the folder for one run; a second holder gets TrainingError."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._fh = None

    def acquire(self) -> OutputLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            try:
                holder = json.loads(fh.read() or "{}")
            except ValueError:
                holder = {}
            fh.close()
            raise TrainingError(
                f"{self.path.parent} is in use by another run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
                f"since {holder.get('started', '?')}). Wait for it to finish or stop it, or pick another --output_dir."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the flock
            self._fh = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
