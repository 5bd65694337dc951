"""One job's folder and its state.

    job.json        what was asked (owner, name, settings, images); written once, at creation
    state.json      JobState (queued | running | done | failed | stopped), with the error and timestamps
    uploads/        the checked images (renamed by the app) and their caption files
    output/         the trainer's --output_dir (LoRA, kohya file, model card, checkpoints, samples)
    events.jsonl    the trainer's progress events, one JSON object a line (events.py)
    log.txt         the worker's log
    stop            present while a stop is requested
    .worker.lock    flock held by the job's worker process for as long as it lives

Liveness comes from the kernel, not from pids: the worker holds ``.worker.lock`` (the scheduler
takes it before the worker starts and hands the descriptor over), and the kernel drops the lock
when the process dies, however it dies. A job that says ``running`` while nobody holds its lock
lost its worker: ``reconcile`` marks it failed with the reason, so nothing shows as running forever.
"""

from __future__ import annotations

import json
import signal
import time
import traceback
from enum import Enum
from pathlib import Path
from typing import Any

from adaprelora_diffusion.engine.atomic import atomic_write_text
from adaprelora_diffusion.engine.checkpoints import list_checkpoints
from adaprelora_diffusion.engine.lock import is_locked

__all__ = ["JobState", "read_job", "write_job", "read_state", "update_state", "worker_alive", "reconcile",
           "lock_path", "stop_path", "output_dir", "uploads_dir", "log_tail", "log_error", "describe_exit", "resumable_step"]


class JobState(str, Enum):
    """A job's state, as ``state.json`` stores it (the member's value: plain JSON text)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


def lock_path(job_dir: Path) -> Path:
    return job_dir / ".worker.lock"


def stop_path(job_dir: Path) -> Path:
    return job_dir / "stop"


def output_dir(job_dir: Path) -> Path:
    return job_dir / "output"


def uploads_dir(job_dir: Path) -> Path:
    return job_dir / "uploads"


def read_job(job_dir: Path) -> dict[str, Any]:
    return json.loads((job_dir / "job.json").read_text(encoding="utf-8"))


def write_job(job_dir: Path, job: dict[str, Any]) -> None:
    atomic_write_text(job_dir / "job.json", json.dumps(job, indent=2))


def read_state(job_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((job_dir / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"state": JobState.QUEUED.value}


def update_state(job_dir: Path, **changes: Any) -> dict[str, Any]:
    """Read, change and atomically rewrite state.json (callers hold the workspace lock, or are the
    job's live worker, the only writer while it holds the job's lock)."""
    state = {**read_state(job_dir), **changes, "updated": time.time()}
    atomic_write_text(job_dir / "state.json", json.dumps(state, indent=2))
    return state


def worker_alive(job_dir: Path) -> bool:
    """Whether a process holds the job's worker lock."""
    return is_locked(lock_path(job_dir))


def log_tail(job_dir: Path, lines: int = 40, max_bytes: int = 64_000) -> str:
    path = job_dir / "log.txt"
    if not path.is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - max_bytes))
        text = fh.read().decode("utf-8", errors="replace")
    # as a terminal shows it: a progress bar's carriage returns keep only its latest state
    shown = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join([line for line in shown if line.strip()][-lines:])


def log_error(job_dir: Path, what: str, err: BaseException) -> None:
    """Append ``what`` failed, with the traceback, to the job's log (the page shows one sentence, the log the rest)."""
    lines = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    with open(job_dir / "log.txt", "a", encoding="utf-8") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR app: {what} failed:\n{lines}")


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "ended without reporting a result (it was killed, ran out of memory, or the machine restarted)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}" + (" (out of memory, or `kill -9`)" if name == "SIGKILL" else "")
    return f"exited with status {returncode} without reporting a result"


def resumable_step(job_dir: Path) -> int:
    """The step a resumed worker continues from: its newest complete checkpoint's (0 without one)."""
    checkpoints = list_checkpoints(output_dir(job_dir))
    return int(checkpoints[-1].name.split("-")[1]) if checkpoints else 0


def _resume_hint(job_dir: Path) -> str:
    checkpoints = list_checkpoints(output_dir(job_dir))
    if checkpoints:
        return f" Resume continues from {checkpoints[-1].name}."
    return " No checkpoint was written yet: Resume starts the training again."


def reconcile(job_dir: Path, returncode: int | None = None) -> dict[str, Any]:
    """The job's state, with a dead worker turned into ``failed`` and its reason (call under the workspace lock).

    The lock is tested before the state is read: a worker writes its final state and only then
    lets go of the lock, so a free lock with ``running`` still on disk means the worker died."""
    alive = worker_alive(job_dir)
    state = read_state(job_dir)
    if state.get("state") == JobState.RUNNING and not alive:
        last = [line for line in log_tail(job_dir, 5).splitlines() if line.strip()]
        detail = f" Last log line: {last[-1][-300:]}" if last else ""
        pid = state.get("pid", "?")
        reason = f"The training worker (pid {pid}) {describe_exit(returncode)}.{_resume_hint(job_dir)}{detail}"
        state = update_state(job_dir, state=JobState.FAILED, error=reason, finished_at=time.time())
    return state
