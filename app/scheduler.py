"""The queue: one training worker at a time, the oldest queued job next, dead workers noticed.

A job's worker is its own process (``python -m app.worker <job folder>``), started in a new
session so that neither the browser going away nor the app being killed or restarted touches it.
The queue is the jobs' ``state.json`` files; starting the next job happens under the workspace
lock, from the app's background loop and from a worker that has just finished (so the queue
drains even while the app is down). "One at a time" is per workspace: the app drives one device.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import jobs
from .workspace import Workspace

logger = logging.getLogger(__name__)

__all__ = ["start_next", "queue_positions", "Scheduler", "LOCK_FD_ENV"]

LOCK_FD_ENV = "ADAPRELORA_WORKER_LOCK_FD"
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def _worker_env(lock_fd: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.update({LOCK_FD_ENV: str(lock_fd), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"})
    return env


def _spawn(job_dir: Path) -> subprocess.Popen:
    """Start the job's worker holding the job's lock: taken here, handed over as an inherited descriptor,
    so the job is never "running" without a live lock holder, even for a moment."""
    import fcntl

    fd = os.open(jobs.lock_path(job_dir), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        jobs.stop_path(job_dir).unlink(missing_ok=True)
        with open(job_dir / "log.txt", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", f"{__package__}.worker", str(job_dir)], cwd=job_dir,
                                    env=_worker_env(fd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    pass_fds=(fd,), start_new_session=True)
        state = jobs.read_state(job_dir)
        jobs.update_state(job_dir, state=jobs.JobState.RUNNING, pid=proc.pid, started_at=time.time(), error=None,
                          attempt=int(state.get("attempt", 0)) + 1)
        return proc
    finally:
        os.close(fd)  # the worker keeps its own copy; the lock lives as long as the worker


def _queued(ws: Workspace) -> list[Path]:
    found = [(jobs.read_state(d), d) for d in ws.job_dirs()]
    return [d for s, d in sorted(found, key=lambda x: x[0].get("queued_at", 0)) if s.get("state") == jobs.JobState.QUEUED]


def start_next(ws: Workspace, children: dict[str, subprocess.Popen] | None = None) -> str | None:
    """If no job is training, start the oldest queued one; returns its id (None if nothing started)."""
    with ws.locked():
        for job_dir in ws.job_dirs():
            state = jobs.reconcile(job_dir, _returncode(children, job_dir.name))
            if state.get("state") == jobs.JobState.RUNNING:
                return None
        queued = _queued(ws)
        if not queued:
            return None
        proc = _spawn(queued[0])
        if children is not None:
            children[queued[0].name] = proc
        logger.info("Started job %s (worker pid %d).", queued[0].name, proc.pid)
        return queued[0].name


def _returncode(children: dict[str, subprocess.Popen] | None, job_id: str) -> int | None:
    proc = (children or {}).get(job_id)
    return None if proc is None else proc.poll()


def queue_positions(ws: Workspace) -> dict[str, int]:
    """1 for the next job to start, and so on."""
    return {d.name: i for i, d in enumerate(_queued(ws), start=1)}


class Scheduler(threading.Thread):
    """The app's background loop: notice dead workers, start queued jobs, reap finished children."""

    def __init__(self, ws: Workspace, interval: float = 1.0):
        super().__init__(name="adaprelora-scheduler", daemon=True)
        self.ws, self.interval = ws, interval
        self.children: dict[str, subprocess.Popen] = {}
        self._halt = threading.Event()

    def returncode(self, job_id: str) -> int | None:
        return _returncode(self.children, job_id)

    def tick(self) -> None:
        start_next(self.ws, self.children)
        for job_id, proc in list(self.children.items()):
            # poll() reaps the child; once start_next has reconciled its job, it is accounted for
            if proc.poll() is not None and jobs.read_state(self.ws.jobs_dir / job_id).get("state") != jobs.JobState.RUNNING:
                del self.children[job_id]

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.tick()
            except Exception:  # the loop must outlive a bad job folder; the error is in the log
                logger.exception("Scheduler tick failed")

    def stop(self) -> None:
        self._halt.set()
