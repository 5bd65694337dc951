"""Job ids, worker liveness from the kernel's lock, dead workers turned into failed jobs, progress from events."""

from __future__ import annotations

import os

import subprocess
import sys
import time

import pytest

from app import jobs
from app.errors import AppError
from app.events import EventLog, loss_series, progress_summary
from app.workspace import Workspace


def _job(ws: Workspace, owner: str = "") -> str:
    job_id = ws.new_job_id()
    folder = ws.jobs_dir / job_id
    folder.mkdir()
    jobs.update_state(folder, state="queued", queued_at=time.time())
    jobs.write_job(folder, {"id": job_id, "owner": owner, "name": "x", "train": {}})
    return job_id


def test_job_ids_are_checked_before_any_path_is_built(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    job_id = _job(ws)
    assert ws.job_dir(job_id) == ws.jobs_dir / job_id
    for bad in ("../../etc", "/etc/passwd", job_id + "/..", job_id[:-1] + "g", None, 7, "20260101-120000-1a2b3c4d"):
        with pytest.raises(AppError, match="Unknown job id"):
            ws.job_dir(bad)


def test_a_running_job_without_a_live_lock_holder_becomes_failed_with_the_reason(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    folder = ws.jobs_dir / _job(ws)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(jobs.lock_path(folder))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        jobs.update_state(folder, state="running", pid=holder.pid)
        assert jobs.worker_alive(folder) and jobs.reconcile(folder)["state"] == "running"
        (folder / "log.txt").write_text("step 3/10\nsteps:  30%|███ 3/10\rsteps:  40%|████ 4/10\n")
        holder.kill()
        holder.wait()
        assert not jobs.worker_alive(folder)
        state = jobs.reconcile(folder, holder.returncode)
    finally:
        holder.kill()
    assert state["state"] == "failed"
    assert f"pid {holder.pid}) was killed by SIGKILL" in state["error"]
    assert "No checkpoint was written yet: Resume starts the training again." in state["error"]
    assert state["error"].endswith("Last log line: steps:  40%|████ 4/10")  # a bar's latest redraw, as a terminal shows it
    assert jobs.reconcile(folder)["state"] == "failed"  # settled: reconciling again changes nothing


def test_progress_summary_and_loss_curve_come_from_the_event_file(tmp_path, monkeypatch):
    log = EventLog(tmp_path / "events.jsonl")
    clock = iter(range(100, 200))
    monkeypatch.setattr(time, "time", lambda: float(next(clock)))
    log.write("start", step=0, max_steps=10)
    for step in range(1, 5):  # one step a second
        log.write("step", step=step, max_steps=10, loss=1.0 / step)
    log.write("start", step=2, max_steps=10)  # resumed from checkpoint-2: steps 3-4 are trained again
    for step in (3, 4, 5):
        log.write("step", step=step, max_steps=10, loss=0.1 * step)
    with open(tmp_path / "events.jsonl", "a") as fh:
        fh.write('{"kind": "step", "step": 6, "los')  # a line being written
    summary = progress_summary(tmp_path / "events.jsonl")
    assert summary == {"step": 5, "max_steps": 10, "loss": 0.5, "eta_seconds": 5.0, "attempt_pid": None, "started": True}
    assert loss_series(tmp_path / "events.jsonl") == [(1, 1.0), (2, 0.5), (3, 0.30000000000000004), (4, 0.4), (5, 0.5)]
    assert progress_summary(tmp_path / "missing.jsonl")["step"] == 0


def test_one_app_per_workspace(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    assert not ws.app_alive()
    held = ws.hold_app_lock()
    try:
        assert ws.app_alive()
        with pytest.raises(AppError, match="Another app is already serving the workspace"):
            Workspace.open(tmp_path / "ws").hold_app_lock()
    finally:
        os.close(held)  # the lock's file descriptor; closing it releases the lock
    assert not ws.app_alive()


def test_auth_comes_from_flags_and_the_environment():
    from app.cli import build_parser, parse_auth

    assert parse_auth(["a:1"], "b:2, c:x:y") == [("a", "1"), ("b", "2"), ("c", "x:y")]
    with pytest.raises(ValueError, match="must look like user:password"):
        parse_auth(["nopassword"], None)
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.share, args.workspace) == ("127.0.0.1", 7860, False, "./adaprelora-workspace")


def test_the_step_shown_is_the_one_a_resume_continues_from_until_the_new_worker_has_resumed(tmp_path):
    """A worker killed at step 65 after checkpoint-60: failed, queued again and starting up, the job
    shows step 60 (steps 61-65 are lost); once the new worker's trainer has resumed, its own steps."""
    from adaprelora_diffusion.engine.lock import try_lock
    from app.service import JobService
    from app.uploads import UploadLimits

    ws = Workspace.open(tmp_path / "ws")
    job_id = _job(ws)
    folder = ws.jobs_dir / job_id
    for step in (30, 60):  # complete checkpoints (a manifest marks them)
        (folder / "output" / f"checkpoint-{step}").mkdir(parents=True)
        (folder / "output" / f"checkpoint-{step}" / "manifest.json").write_text("{}")
    log = EventLog(folder / "events.jsonl")
    log.write("attempt", pid=111)
    log.write("start", step=0, max_steps=100)
    for step in range(1, 66):
        log.write("step", step=step, max_steps=100, loss=0.1)
    service = JobService(ws, [], UploadLimits())

    def shown(**state):
        jobs.update_state(folder, **state)
        return service.job_status(job_id, "")["step"]

    assert shown(state="failed", pid=111) == 60
    assert shown(state="queued") == 60
    held = try_lock(jobs.lock_path(folder))  # a live worker, pid 222, that has not written its attempt yet
    try:
        assert shown(state="running", pid=222) == 60
        log.write("attempt", pid=222)
        assert shown(state="running", pid=222) == 60  # loading the model, resuming
        log.write("start", step=60, max_steps=100)
        log.write("step", step=61, max_steps=100, loss=0.1)
        assert shown(state="running", pid=222) == 61
    finally:
        os.close(held)
