"""Downloads: the job's files one by one or as one zip, handed to Gradio as copies.

Gradio serves only its own upload/cache folder here (``allowed_paths`` is empty and the jobs
folder is in ``blocked_paths``), so a file leaves the workspace only as a copy that a handler
made after checking that the file belongs to the caller's job: a client never names a path,
only one of the fixed kinds below. Copies older than an hour are removed.
"""

from __future__ import annotations

import re
import secrets
import shutil
import time
import zipfile
from pathlib import Path

from adaprelora_diffusion.dreambooth.lora_files import LORA_WEIGHT_NAME
from adaprelora_diffusion.dreambooth.trainer import KOHYA_WEIGHT_NAME, RUN_CONFIG_NAME

from . import jobs
from .errors import AppError

__all__ = ["DOWNLOADS", "serve_copy", "job_file", "build_zip"]

#: what a client may ask for, and the file in the job's output folder it means
DOWNLOADS = {"lora": LORA_WEIGHT_NAME, "kohya": KOHYA_WEIGHT_NAME, "card": "README.md", "config": RUN_CONFIG_NAME}
_MAX_AGE = 3600


def _exports_dir(gradio_dir: Path) -> Path:
    return gradio_dir / "exports"


def _sweep(folder: Path) -> None:
    if not folder.is_dir():
        return
    now = time.time()
    for old in folder.iterdir():
        if now - old.stat().st_mtime > _MAX_AGE:
            shutil.rmtree(old, ignore_errors=True)


def serve_copy(gradio_dir: Path, source: Path, name: str | None = None) -> str:
    """Copy ``source`` under an unguessable folder in Gradio's own folder; the path to return to Gradio."""
    exports = _exports_dir(gradio_dir)
    _sweep(exports)
    folder = exports / secrets.token_hex(16)
    folder.mkdir(parents=True)
    target = folder / (name or source.name)
    shutil.copyfile(source, target)
    return str(target)


def job_file(job_dir: Path, kind: str) -> Path:
    """The output file of ``kind`` (one of DOWNLOADS), checked to lie in this job's own folder."""
    if kind not in DOWNLOADS:
        raise AppError(f"Unknown download {str(kind)[:40]!r}: choose one of zip, {', '.join(DOWNLOADS)}.")
    path = (jobs.output_dir(job_dir) / DOWNLOADS[kind]).resolve()
    if job_dir.resolve() not in path.parents:
        raise AppError("That file is not part of this job.")
    if not path.is_file():
        state = jobs.read_state(job_dir).get("state")
        raise AppError(f"This job has no {DOWNLOADS[kind]} yet (it is {state}): downloads appear when training is done "
                       "or stopped.")
    return path


def download_name(job: dict) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", job.get("name", "lora")).strip("-")[:60] or "lora"


def build_zip(job_dir: Path, gradio_dir: Path) -> str:
    """One zip with the diffusers file, the kohya file, the model card and the training config."""
    files = {kind: job_file(job_dir, kind) for kind in ("lora", "card", "config")}
    kohya = jobs.output_dir(job_dir) / DOWNLOADS["kohya"]
    if kohya.is_file():
        files["kohya"] = kohya
    exports = _exports_dir(gradio_dir)
    _sweep(exports)
    folder = exports / secrets.token_hex(16)
    folder.mkdir(parents=True)
    target = folder / f"{download_name(jobs.read_job(job_dir))}-lora.zip"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in files.values():
            zf.write(path, arcname=path.name)
    return str(target)
