"""The workspace folder: every job, the local models and Gradio's own upload cache live in it.

    <workspace>/jobs/<job id>/   one folder per job (see jobs.py); never served to clients directly
    <workspace>/models/          base models a client may name (diffusers folders, .safetensors/.ckpt)
    <workspace>/.gradio/         Gradio's uploads and the copies it serves (GRADIO_TEMP_DIR)

Job ids are made here and checked here: a client's job id reaches the file system only after it
matched ``JOB_ID`` exactly, so ``../``, absolute paths and the like are refused before any ``open``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adaprelora_diffusion.engine.lock import is_locked, try_lock

from .errors import AppError

__all__ = ["Workspace", "JOB_ID", "UNKNOWN_JOB"]

#: creation time (sortable) and 32 random bits: unguessable enough that ids are not enumerable.
JOB_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{8}$")
UNKNOWN_JOB = "Unknown job id {job_id!r}: pick a job from the list (ids look like 20260101-120000-1a2b3c4d)."


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def open(cls, root: str | os.PathLike) -> Workspace:
        ws = cls(Path(root).expanduser().resolve())
        for folder in (ws.jobs_dir, ws.models_dir, ws.gradio_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return ws

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def gradio_dir(self) -> Path:
        return self.root / ".gradio"

    def new_job_id(self) -> str:
        return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(4)

    def job_dir(self, job_id: object) -> Path:
        """The folder of an existing job; anything that is not a well-formed id of one is refused."""
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise AppError(UNKNOWN_JOB.format(job_id=str(job_id)[:80]))
        folder = self.jobs_dir / job_id
        if not (folder / "job.json").is_file():
            raise AppError(UNKNOWN_JOB.format(job_id=job_id))
        return folder

    def job_dirs(self) -> list[Path]:
        """Every complete job folder, oldest first."""
        if not self.jobs_dir.is_dir():
            return []
        return sorted(p for p in self.jobs_dir.iterdir() if JOB_ID.match(p.name) and (p / "job.json").is_file())

    def hold_app_lock(self) -> int:
        """Held by the serving app for its whole life: one app per workspace, and workers can tell
        whether an app is up (then its loop starts the next job, as the parent that sees exit codes)."""
        fd = try_lock(self.root / ".app.lock")
        if fd is None:
            raise AppError(f"Another app is already serving the workspace {self.root}: stop it, or pass another --workspace.")
        return fd

    def app_alive(self) -> bool:
        return is_locked(self.root / ".app.lock")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialize state changes (queueing, starting, failing, deleting) across the app and the workers."""
        import fcntl

        with open(self.root / ".jobs.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
