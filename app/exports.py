"""Downloads: which of a job's files a client may ask for, and the zip of them.

A client never names a path, only one of the fixed kinds below; each is checked to lie in the
job's own folder. What leaves the workspace is a copy in the caller's served folder (served.py).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from adaprelora_diffusion.dreambooth.lora_files import LORA_WEIGHT_NAME
from adaprelora_diffusion.dreambooth.trainer import KOHYA_WEIGHT_NAME, RUN_CONFIG_NAME

from . import jobs
from .errors import AppError

__all__ = ["DOWNLOADS", "job_file", "build_zip"]

#: what a client may ask for, and the file in the job's output folder it means
DOWNLOADS = {"lora": LORA_WEIGHT_NAME, "kohya": KOHYA_WEIGHT_NAME, "card": "README.md", "config": RUN_CONFIG_NAME}


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


def build_zip(job_dir: Path, dest_dir: Path) -> Path:
    """One zip in ``dest_dir`` with the diffusers file, the kohya file, the model card (its README, which says
    which tool reads which file) and the training config."""
    files = {kind: job_file(job_dir, kind) for kind in ("lora", "card", "config")}
    kohya = jobs.output_dir(job_dir) / DOWNLOADS["kohya"]
    if kohya.is_file():
        files["kohya"] = kohya
    target = Path(dest_dir) / f"{download_name(jobs.read_job(job_dir))}-lora.zip"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in files.values():
            zf.write(path, arcname=path.name)
    return target
