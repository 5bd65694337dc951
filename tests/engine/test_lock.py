"""engine.lock: one run per output folder; a dead holder's lock is taken over."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from adaprelora_diffusion.engine.errors import TrainingError
from adaprelora_diffusion.engine.lock import LOCK_NAME, OutputLock

HOLD = "import sys, time; from adaprelora_diffusion.engine.lock import OutputLock; lock = OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_with_pid_and_host(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(TrainingError, match=rf"pid {proc.pid} on {socket.gethostname()}"):
            OutputLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; the kernel dropped the lock
    with OutputLock(tmp_path) as lock:
        assert str(os.getpid()) in lock.path.read_text()
    with OutputLock(tmp_path):  # released on exit
        pass


def test_try_lock_and_is_locked_probe_without_stealing(tmp_path):
    from adaprelora_diffusion.engine.lock import is_locked, try_lock

    path = tmp_path / "x.lock"
    assert not is_locked(path)
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from adaprelora_diffusion.engine.lock import try_lock; "
                             "fd = try_lock(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert is_locked(path) and try_lock(path) is None
        assert is_locked(path)  # probing did not take it away
    finally:
        proc.kill()
        proc.wait()
    fd = try_lock(path)
    assert fd is not None and not is_locked(tmp_path / "other.lock")
    os.close(fd)
