"""What the page and the API endpoints do, as plain Python (no Gradio here), for one user at a time.

``user`` is the logged-in name ("" without auth). A job belongs to the user who created it; to
anyone else it does not exist (the same "Unknown job id" as a wrong id, so ids cannot be probed).
Every file handed out is a copy in the user's own served folder (``served.py``).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import jobs
from .errors import AppError
from .events import EVENTS_NAME, loss_series, progress_summary
from .exports import DOWNLOADS, build_zip, job_file
from .jobs import JobState
from .sampling import Sampler, SampleRequest, checkpoint_names
from .scheduler import Scheduler, queue_positions, start_next
from .served import ServedFiles
from .settings import parse_settings
from .uploads import SetReport, UploadLimits, check_image_set, store_images
from .workspace import UNKNOWN_JOB, Workspace

logger = logging.getLogger(__name__)

__all__ = ["JobService"]

#: how a job's photos are named in its command line (the person repeating it brings their own folder)
PHOTOS_PLACEHOLDER = "./photos"


@dataclass
class JobService:
    ws: Workspace
    model_dirs: Sequence[Path]
    limits: UploadLimits
    scheduler: Scheduler | None = None

    def __post_init__(self):
        self.sampler = Sampler()
        self.served = ServedFiles(self.ws.gradio_dir)

    # -- jobs ----------------------------------------------------------------------------
    def _job_dir(self, job_id: Any, user: str) -> Path:
        job_dir = self.ws.job_dir(job_id)
        if jobs.read_job(job_dir).get("owner", "") != user:
            raise AppError(UNKNOWN_JOB.format(job_id=job_id))
        return job_dir

    def check_upload(self, files: Sequence[tuple[str, Path]], settings: dict | None) -> SetReport:
        return check_image_set(files, parse_settings(settings, self.model_dirs).resolution, self.limits)

    def create_job(self, files: Sequence[tuple[str, Path]], settings: Any, user: str, leave_out_refused: bool = False) -> str:
        """Check the settings and the photos, store them in a new job folder, queue it; returns its id.

        A photo that cannot be used (unreadable, another format, oversized) refuses the whole job,
        unless ``leave_out_refused`` (the page): then it is left out and named in the job's notes."""
        parsed = parse_settings(settings, self.model_dirs)
        report = check_image_set(files, parsed.resolution, self.limits)
        if not files:
            raise AppError("No photos were uploaded: add 3-30 jpg, png or webp photos of the subject.")
        refused = [i.problem for i in report.images if i.problem]
        errors = [e for e in report.errors if not (leave_out_refused and e in refused)]
        if errors:
            raise AppError("Fix the photos before training:\n- " + "\n- ".join(errors))
        notes = report.warnings + ([f"Left out: {p}" for p in refused] if leave_out_refused else [])
        job_id = self.ws.new_job_id()
        job_dir = self.ws.jobs_dir / job_id
        try:
            job_dir.mkdir()
            images = store_images(report, jobs.uploads_dir(job_dir), parsed.captions, parsed.train["instance_prompt"])
            jobs.update_state(job_dir, state=JobState.QUEUED, queued_at=time.time(), error=None)
            jobs.write_job(job_dir, {"id": job_id, "owner": user, "name": parsed.name, "created": time.time(),
                                     "preset": parsed.preset, "trigger_word": parsed.trigger_word,
                                     "class_word": parsed.class_word, "train": parsed.train, "images": images,
                                     "warnings": notes})
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        self._kick()
        return job_id

    def _kick(self) -> None:
        start_next(self.ws, self.scheduler.children if self.scheduler else None)

    def _state(self, job_dir: Path) -> dict[str, Any]:
        state = jobs.read_state(job_dir)
        if state.get("state") == JobState.RUNNING and not jobs.worker_alive(job_dir):
            with self.ws.locked():
                code = self.scheduler.returncode(job_dir.name) if self.scheduler else None
                state = jobs.reconcile(job_dir, code)
        return state

    def job_status(self, job_id: Any, user: str) -> dict[str, Any]:
        """{state, step, max_steps, loss, eta_seconds, error} (and the job's name and queue position).

        ``step`` is the progress that counts: the newest step while a worker trains; the step a resume
        continues from (its newest checkpoint) for a failed job, and for a resumed one until its worker
        has loaded and resumed (steps after that checkpoint are lost with the worker that made them)."""
        job_dir = self._job_dir(job_id, user)
        state = self._state(job_dir)
        summary = progress_summary(job_dir / EVENTS_NAME)
        job = jobs.read_job(job_dir)
        name = state.get("state")
        step = summary["step"]
        training_now = name == JobState.RUNNING and summary["started"] and summary["attempt_pid"] in (None, state.get("pid"))
        if name in (JobState.QUEUED, JobState.FAILED) or (name == JobState.RUNNING and not training_now):
            step = min(step, jobs.resumable_step(job_dir))
        status = {"job_id": job_dir.name, "name": job.get("name"), "state": name,
                  "step": step, "max_steps": summary["max_steps"] or job["train"].get("max_train_steps"),
                  "loss": summary["loss"], "eta_seconds": summary["eta_seconds"] if name == JobState.RUNNING else None,
                  "error": state.get("error"), "queue_position": None}
        if name == JobState.QUEUED:
            status["queue_position"] = queue_positions(self.ws).get(job_dir.name)
        return status

    def list_jobs(self, user: str) -> list[dict[str, Any]]:
        """The user's jobs, newest first."""
        mine = [d for d in self.ws.job_dirs() if jobs.read_job(d).get("owner", "") == user]
        return [self.job_status(d.name, user) for d in reversed(mine)]

    def stop_job(self, job_id: Any, user: str) -> dict[str, Any]:
        """A queued job stops at once; a running one finishes its step, writes a checkpoint and the LoRA."""
        job_dir = self._job_dir(job_id, user)
        with self.ws.locked():
            state = jobs.reconcile(job_dir)
            if state["state"] == JobState.QUEUED:
                jobs.update_state(job_dir, state=JobState.STOPPED, error=None, finished_at=time.time())
            elif state["state"] == JobState.RUNNING:
                jobs.stop_path(job_dir).touch()
            else:
                raise AppError(f"Job {job_dir.name} is already {state['state']}; nothing to stop.")
        return self.job_status(job_id, user)

    def resume_job(self, job_id: Any, user: str) -> dict[str, Any]:
        """Queue a stopped or failed job again; its worker continues from the newest intact checkpoint."""
        job_dir = self._job_dir(job_id, user)
        with self.ws.locked():
            state = jobs.reconcile(job_dir)
            if state["state"] not in (JobState.STOPPED, JobState.FAILED):
                raise AppError(f"Job {job_dir.name} is {state['state']}: only a stopped or failed job can be resumed.")
            jobs.stop_path(job_dir).unlink(missing_ok=True)
            jobs.update_state(job_dir, state=JobState.QUEUED, queued_at=time.time(), error=None)
        self._kick()
        return self.job_status(job_id, user)

    def delete_job(self, job_id: Any, user: str) -> dict[str, Any]:
        """Remove the job's uploads and outputs; a running job's worker is killed first."""
        job_dir = self._job_dir(job_id, user)
        with self.ws.locked():
            state = jobs.read_state(job_dir)
            if jobs.worker_alive(job_dir) and state.get("pid"):
                try:
                    os.killpg(int(state["pid"]), signal.SIGKILL)  # its own session: dataloader workers too
                except ProcessLookupError:
                    pass
                deadline = time.time() + 15
                while jobs.worker_alive(job_dir) and time.time() < deadline:
                    time.sleep(0.1)
            shutil.rmtree(job_dir)
        self._kick()
        return {"job_id": job_dir.name, "deleted": True}

    def failure(self, what: str, err: BaseException, job_id: Any = None, user: str = "") -> str:
        """An unexpected error as one sentence for the person (what failed, what to do); its traceback
        goes to the job's log (``job_id`` of ``user``) or, without a job, to the app's log."""
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        reason = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
        logger.error("%s failed", what, exc_info=err)
        try:
            job_dir = self._job_dir(job_id, user) if job_id else None
        except AppError:
            job_dir = None
        if job_dir is not None:
            jobs.log_error(job_dir, what, err)
            where = "the job's log (Training tab) has the details"
        else:
            where = "the app's log has the details"
        return f"{what} failed ({reason}); {where}. Try again; if it fails again, report it with that log."

    # -- the live view ---------------------------------------------------------------------
    def job_view(self, job_id: Any, user: str) -> dict[str, Any]:
        """Everything the training tab shows, except the sample images (see ``latest_samples``)."""
        job_dir = self._job_dir(job_id, user)
        job = jobs.read_job(job_dir)
        return {"status": self.job_status(job_id, user), "loss": loss_series(job_dir / EVENTS_NAME),
                "samples_key": self._sample_folders(job_dir), "log": jobs.log_tail(job_dir, 10),
                "checkpoints": checkpoint_names(job_dir), "warnings": job.get("warnings", []),
                "prompt": job["train"].get("validation_prompt") or job["train"].get("instance_prompt"),
                "command": self.command(job)}

    @staticmethod
    def command(job: dict[str, Any]) -> str:
        """The ``train_dreambooth.py`` command that repeats this job elsewhere (e.g. on a GPU box)."""
        from adaprelora_diffusion.dreambooth.config import command_line

        train = {**job["train"], "instance_data_dir": PHOTOS_PLACEHOLDER,
                 "output_dir": f"{job.get('name') or 'job'}-lora".replace(" ", "-")}
        return "python train_dreambooth.py " + " ".join(shlex.quote(a) for a in command_line(train))

    @staticmethod
    def _sample_folders(job_dir: Path) -> list[str]:
        """The newest validation folders and their image counts: the gallery changes when this does."""
        folders = sorted((jobs.output_dir(job_dir) / "validation").glob("step-*"))[-2:]
        return [f"{f.name}:{len(list(f.glob('*.png')))}" for f in folders]

    def latest_samples(self, job_id: Any, user: str) -> list[tuple[str, str]]:
        """The newest validation images (the newest step first), captioned with their step."""
        job_dir = self._job_dir(job_id, user)
        out = []
        for folder in sorted((jobs.output_dir(job_dir) / "validation").glob("step-*"), reverse=True)[:2]:
            step = int(folder.name.split("-")[1])
            for image in sorted(folder.glob("*.png"))[:4]:
                out.append((self.served.serve(user, image, f"{folder.name}-{image.name}"), f"step {step} #{image.stem}"))
        return out

    def thumbnails(self, user: str, report: SetReport) -> list[tuple[str, str]]:
        """The usable photos of an upload check, as the caller's own served copies."""
        return [(self.served.serve(user, i.path), i.name) for i in report.usable]

    # -- sampling and downloads --------------------------------------------------------------
    def sample(self, job_id: Any, user: str, request: SampleRequest) -> list[tuple[str, str]]:
        job_dir = self._job_dir(job_id, user)
        base, lora = self.sampler.compare(job_dir, request)
        return [(self.served.serve_image(user, base, "base.png"), f"base model (seed {request.seed})"),
                (self.served.serve_image(user, lora, "lora.png"),
                 f"+ LoRA {request.checkpoint} x{request.lora_scale:g} (seed {request.seed})")]

    def sample_grid(self, job_id: Any, user: str, request: SampleRequest, checkpoints: list[str], scales: list[float]) -> str:
        job_dir = self._job_dir(job_id, user)
        return self.served.serve_image(user, self.sampler.grid(job_dir, request, checkpoints, scales), "grid.png")

    def checkpoints(self, job_id: Any, user: str) -> list[str]:
        return checkpoint_names(self._job_dir(job_id, user))

    def download(self, job_id: Any, user: str, kind: str = "zip") -> str:
        job_dir = self._job_dir(job_id, user)
        if kind == "zip":
            with self.served.scratch() as scratch:
                return self.served.serve(user, build_zip(job_dir, Path(scratch)))
        return self.served.serve(user, job_file(job_dir, kind))

    def download_all(self, job_id: Any, user: str) -> list[str]:
        """The zip and each file on its own (those that exist)."""
        files = [self.download(job_id, user, "zip")]
        for kind in DOWNLOADS:
            try:
                files.append(self.download(job_id, user, kind))
            except AppError:
                continue
        return files
