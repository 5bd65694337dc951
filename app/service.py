"""What the page and the API endpoints do, as plain Python (no Gradio here), for one user at a time.

``user`` is the logged-in name ("" without auth). A job belongs to the user who created it; to
anyone else it does not exist (the same "Unknown job id" as a wrong id, so ids cannot be probed).
"""

from __future__ import annotations

import os
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
from .exports import DOWNLOADS, build_zip, job_file, serve_copy
from .sampling import Sampler, SampleRequest, checkpoint_names
from .scheduler import Scheduler, queue_positions, start_next
from .settings import parse_settings
from .uploads import SetReport, UploadLimits, check_image_set, store_images
from .workspace import UNKNOWN_JOB, Workspace

__all__ = ["JobService"]


@dataclass
class JobService:
    ws: Workspace
    model_dirs: Sequence[Path]
    limits: UploadLimits
    scheduler: Scheduler | None = None

    def __post_init__(self):
        self.sampler = Sampler()

    # -- jobs ----------------------------------------------------------------------------
    def _job_dir(self, job_id: Any, user: str) -> Path:
        job_dir = self.ws.job_dir(job_id)
        if jobs.read_job(job_dir).get("owner", "") != user:
            raise AppError(UNKNOWN_JOB.format(job_id=job_id))
        return job_dir

    def check_upload(self, files: Sequence[tuple[str, Path]], settings: dict | None) -> SetReport:
        return check_image_set(files, parse_settings(settings, self.model_dirs).resolution, self.limits)

    def create_job(self, files: Sequence[tuple[str, Path]], settings: Any, user: str) -> str:
        """Check the settings and the photos, store them in a new job folder, queue it; returns its id."""
        parsed = parse_settings(settings, self.model_dirs)
        report = check_image_set(files, parsed.resolution, self.limits)
        if not files:
            raise AppError("No photos were uploaded: add 3-30 jpg, png or webp photos of the subject.")
        if report.errors:
            raise AppError("Fix the photos before training:\n- " + "\n- ".join(report.errors))
        job_id = self.ws.new_job_id()
        job_dir = self.ws.jobs_dir / job_id
        try:
            job_dir.mkdir()
            images = store_images(report, jobs.uploads_dir(job_dir), parsed.captions, parsed.train["instance_prompt"])
            jobs.update_state(job_dir, state="queued", queued_at=time.time(), error=None)
            jobs.write_job(job_dir, {"id": job_id, "owner": user, "name": parsed.name, "created": time.time(),
                                     "preset": parsed.preset, "trigger_word": parsed.trigger_word,
                                     "class_word": parsed.class_word, "train": parsed.train, "images": images,
                                     "warnings": report.warnings})
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        self._kick()
        return job_id

    def _kick(self) -> None:
        start_next(self.ws, self.scheduler.children if self.scheduler else None)

    def _state(self, job_dir: Path) -> dict[str, Any]:
        state = jobs.read_state(job_dir)
        if state.get("state") == "running" and not jobs.worker_alive(job_dir):
            with self.ws.locked():
                code = self.scheduler.returncode(job_dir.name) if self.scheduler else None
                state = jobs.reconcile(job_dir, code)
        return state

    def job_status(self, job_id: Any, user: str) -> dict[str, Any]:
        """{state, step, max_steps, loss, eta_seconds, error} (and the job's name and queue position)."""
        job_dir = self._job_dir(job_id, user)
        state = self._state(job_dir)
        summary = progress_summary(job_dir / EVENTS_NAME)
        job = jobs.read_job(job_dir)
        status = {"job_id": job_dir.name, "name": job.get("name"), "state": state.get("state"),
                  "step": summary["step"], "max_steps": summary["max_steps"] or job["train"].get("max_train_steps"),
                  "loss": summary["loss"], "eta_seconds": summary["eta_seconds"] if state.get("state") == "running" else None,
                  "error": state.get("error"), "queue_position": None}
        if status["state"] == "queued":
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
            if state["state"] == "queued":
                jobs.update_state(job_dir, state="stopped", error=None, finished_at=time.time())
            elif state["state"] == "running":
                jobs.stop_path(job_dir).touch()
            else:
                raise AppError(f"Job {job_dir.name} is already {state['state']}; nothing to stop.")
        return self.job_status(job_id, user)

    def resume_job(self, job_id: Any, user: str) -> dict[str, Any]:
        """Queue a stopped or failed job again; its worker continues from the newest intact checkpoint."""
        job_dir = self._job_dir(job_id, user)
        with self.ws.locked():
            state = jobs.reconcile(job_dir)
            if state["state"] not in ("stopped", "failed"):
                raise AppError(f"Job {job_dir.name} is {state['state']}: only a stopped or failed job can be resumed.")
            jobs.stop_path(job_dir).unlink(missing_ok=True)
            jobs.update_state(job_dir, state="queued", queued_at=time.time(), error=None)
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

    # -- the live view ---------------------------------------------------------------------
    def job_view(self, job_id: Any, user: str) -> dict[str, Any]:
        """Everything the training tab shows, except the sample images (see ``latest_samples``)."""
        job_dir = self._job_dir(job_id, user)
        job = jobs.read_job(job_dir)
        return {"status": self.job_status(job_id, user), "loss": loss_series(job_dir / EVENTS_NAME),
                "samples_key": self._sample_folders(job_dir), "log": jobs.log_tail(job_dir, 10),
                "checkpoints": checkpoint_names(job_dir), "warnings": job.get("warnings", []),
                "prompt": job["train"].get("validation_prompt") or job["train"].get("instance_prompt")}

    @staticmethod
    def _sample_folders(job_dir: Path) -> list[str]:
        """The newest validation folders and their image counts: the gallery changes when this does."""
        folders = sorted((jobs.output_dir(job_dir) / "validation").glob("step-*"))[-2:]
        return [f"{f.name}:{len(list(f.glob('*.png')))}" for f in folders]

    def latest_samples(self, job_id: Any, user: str) -> list[tuple[str, str]]:
        """Copies of the newest validation images, captioned with their step."""
        job_dir = self._job_dir(job_id, user)
        out = []
        for folder in sorted((jobs.output_dir(job_dir) / "validation").glob("step-*"))[-2:]:
            step = int(folder.name.split("-")[1])
            for image in sorted(folder.glob("*.png"))[:4]:
                out.append((serve_copy(self.ws.gradio_dir, image, f"{folder.name}-{image.name}"), f"step {step} #{image.stem}"))
        return out

    # -- sampling and downloads --------------------------------------------------------------
    def sample(self, job_id: Any, user: str, request: SampleRequest) -> list[tuple[str, str]]:
        job_dir = self._job_dir(job_id, user)
        base, lora = self.sampler.compare(job_dir, request)
        return [(self._serve_image(base, "base.png"), f"base model (seed {request.seed})"),
                (self._serve_image(lora, "lora.png"), f"+ LoRA {request.checkpoint} x{request.lora_scale:g} (seed {request.seed})")]

    def sample_grid(self, job_id: Any, user: str, request: SampleRequest, checkpoints: list[str], scales: list[float]) -> str:
        job_dir = self._job_dir(job_id, user)
        return self._serve_image(self.sampler.grid(job_dir, request, checkpoints, scales), "grid.png")

    def _serve_image(self, image, name: str) -> str:
        import tempfile

        with tempfile.TemporaryDirectory(dir=self.ws.gradio_dir) as tmp:
            path = Path(tmp) / name
            image.save(path)
            return serve_copy(self.ws.gradio_dir, path)

    def checkpoints(self, job_id: Any, user: str) -> list[str]:
        return checkpoint_names(self._job_dir(job_id, user))

    def download(self, job_id: Any, user: str, kind: str = "zip") -> str:
        job_dir = self._job_dir(job_id, user)
        if kind == "zip":
            return build_zip(job_dir, self.ws.gradio_dir)
        return serve_copy(self.ws.gradio_dir, job_file(job_dir, kind))

    def download_all(self, job_id: Any, user: str) -> list[str]:
        """The zip and each file on its own (those that exist)."""
        job_dir = self._job_dir(job_id, user)
        files = [build_zip(job_dir, self.ws.gradio_dir)]
        for kind in DOWNLOADS:
            try:
                files.append(serve_copy(self.ws.gradio_dir, job_file(job_dir, kind)))
            except AppError:
                continue
        return files

