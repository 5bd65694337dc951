"""Closing the tab or killing the app loses nothing; a dead worker shows as failed and Resume
continues from its checkpoint, ending bit-identical to an uninterrupted run. While a job trains,
status calls answer in well under 200 ms."""

from __future__ import annotations

import os
import signal
import statistics
import time

import httpx
import pytest
from safetensors.torch import load_file

from .conftest import demo_images, read_state, tiny_settings, wait_for

gradio_client = pytest.importorskip("gradio_client")
STEPS = 60


def _status_latencies_ms(url: str, job_id: str, count: int = 15) -> list[float]:
    """The status endpoint over plain HTTP, as any client (gradio_client included) reaches it."""
    out = []
    with httpx.Client() as http:
        for _ in range(count):
            t0 = time.perf_counter()
            response = http.post(url + "gradio_api/run/job_status", json={"data": [job_id]}, timeout=10)
            out.append((time.perf_counter() - t0) * 1000)
            assert response.status_code == 200 and response.json()["data"][0]["job_id"] == job_id
            time.sleep(0.05)
    return out


def test_jobs_survive_the_app_and_a_killed_worker_resumes_bit_identically(launch, tiny_model_dir, tmp_path, hold):
    """Jobs are held at known steps (the workers' test hook), so nothing here races the machine's speed."""
    workspace = tmp_path / "workspace"
    settings = tiny_settings(tiny_model_dir, max_train_steps=STEPS, checkpointing_steps=10, validation_steps=100)
    files = [gradio_client.handle_file(p) for p in demo_images()]

    hold.at(3)  # every job waits after step 3
    app = launch(workspace=workspace, env=hold.env())
    client = app.client()
    first = client.predict(files, settings, api_name="/create_job")
    second = client.predict(files, settings, api_name="/create_job")
    wait_for(client, first, until=lambda s: s["state"] == "running" and s["step"] == 3)
    queued = client.predict(second, api_name="/job_status")
    assert queued["state"] == "queued" and queued["queue_position"] == 1, queued  # one job trains at a time

    latencies = _status_latencies_ms(app.url, first)
    print(f"\nstatus latency while training: median {statistics.median(latencies):.0f} ms, max {max(latencies):.0f} ms")
    assert statistics.median(latencies) < 200, latencies

    app.kill(signal.SIGKILL)  # the app dies; the worker does not
    time.sleep(1.5)
    assert read_state(workspace, first)["state"] == "running"
    app = launch(workspace=workspace, env=hold.env())  # a restart on the same workspace reconnects to the live job
    client = app.client()
    assert client.predict(first, api_name="/job_status")["state"] == "running"
    hold.at(None, first)  # the first job goes on to the end
    hold.at(11)  # the second waits after step 11, with checkpoint-10 written
    assert wait_for(client, first)["state"] == "done"
    assert {j["job_id"]: j["state"] for j in client.predict(api_name="/list_jobs")}[first] == "done"

    # the second job starts once the first is done; kill its worker after its first checkpoint
    wait_for(client, second, until=lambda s: s["state"] == "running" and s["step"] == 11)
    assert (workspace / "jobs" / second / "output" / "checkpoint-10").is_dir()
    os.kill(read_state(workspace, second)["pid"], signal.SIGKILL)
    failed = wait_for(client, second, states=("failed",), timeout=30)
    assert "SIGKILL" in failed["error"] and "Resume continues from checkpoint-10." in failed["error"], failed
    assert failed["step"] == 10, failed  # step 11 died with the worker: the job stands where a resume continues

    hold.release()
    requeued = client.predict(second, api_name="/resume_job")
    assert requeued["step"] == 10, requeued
    resumed = wait_for(client, second)
    assert resumed["state"] == "done" and resumed["step"] == STEPS, resumed
    assert "Resumed from" in (workspace / "jobs" / second / "log.txt").read_text()
    lora = [load_file(str(workspace / "jobs" / j / "output" / "pytorch_lora_weights.safetensors")) for j in (first, second)]
    assert lora[0].keys() == lora[1].keys()
    assert all((lora[0][k] == lora[1][k]).all() for k in lora[0]), "the resumed run differs from the uninterrupted one"


def test_stop_saves_a_checkpoint_resume_requeues_and_delete_removes_everything(shared_app, tiny_model_dir, shared_hold):
    client = shared_app.client()
    shared_hold.at(2)
    try:
        job = client.predict([gradio_client.handle_file(p) for p in demo_images()],
                             tiny_settings(tiny_model_dir, max_train_steps=400, checkpointing_steps=1000, validation_steps=1000),
                             api_name="/create_job")
        wait_for(client, job, until=lambda s: s["step"] == 2)  # held after step 2
        client.predict(job, api_name="/stop_job")
    finally:
        shared_hold.release()
    stopped = wait_for(client, job)
    assert stopped["state"] == "stopped" and stopped["step"] == 2, stopped  # the step it was on when Stop came
    folder = shared_app.workspace / "jobs" / job
    assert (folder / "output" / f"checkpoint-{stopped['step']}").is_dir()  # Stop's own checkpoint
    assert (folder / "output" / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(Exception, match="already stopped; nothing to stop"):
        client.predict(job, api_name="/stop_job")

    assert client.predict(job, api_name="/resume_job")["state"] in ("queued", "running")
    with pytest.raises(Exception, match="only a stopped or failed job can be resumed"):
        client.predict(job, api_name="/resume_job")
    wait_for(client, job, until=lambda s: s["state"] == "running" and s["step"] > stopped["step"])

    assert client.predict(job, api_name="/delete_job") == {"job_id": job, "deleted": True}  # kills the worker first
    assert not folder.exists()
    assert job not in [j["job_id"] for j in client.predict(api_name="/list_jobs")]
    with pytest.raises(Exception, match="Unknown job id"):
        client.predict(job, api_name="/job_status")
