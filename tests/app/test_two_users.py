"""Two logged-in users at once: both jobs complete, one after the other, and each sees only their own."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from .conftest import app_env, demo_images, read_state, tiny_settings, wait_for

gradio_client = pytest.importorskip("gradio_client")


def test_two_users_train_one_after_the_other_and_see_only_their_own_jobs(launch, tiny_model_dir):
    # one login from the flag, one from the environment variable
    app = launch("--auth", "alice:wonderland", env=app_env(ADAPRELORA_APP_AUTH="bob:builder"))
    with pytest.raises(Exception):
        gradio_client.Client(app.url, verbose=False)  # no login, no app
    assert httpx.get(app.url + "gradio_api/info").status_code == 401
    alice, bob = app.client(auth=("alice", "wonderland")), app.client(auth=("bob", "builder"))

    def create(client):
        return client.predict([gradio_client.handle_file(p) for p in demo_images()], tiny_settings(tiny_model_dir),
                              api_name="/create_job")

    with ThreadPoolExecutor(2) as pool:
        job_a, job_b = pool.map(create, (alice, bob))
    assert wait_for(alice, job_a)["state"] == "done"
    assert wait_for(bob, job_b)["state"] == "done"

    a, b = read_state(app.workspace, job_a), read_state(app.workspace, job_b)
    first, second = sorted((a, b), key=lambda s: s["started_at"])
    assert second["started_at"] >= first["finished_at"] - 0.5, "the two jobs trained at the same time"

    assert [j["job_id"] for j in alice.predict(api_name="/list_jobs")] == [job_a]
    assert [j["job_id"] for j in bob.predict(api_name="/list_jobs")] == [job_b]
    for endpoint in ("/job_status", "/stop_job", "/resume_job", "/delete_job"):
        with pytest.raises(Exception, match="Unknown job id"):
            bob.predict(job_a, api_name=endpoint)
    with pytest.raises(Exception, match="Unknown job id"):
        bob.predict(job_a, "zip", api_name="/download")
    with pytest.raises(Exception, match="Unknown job id"):
        bob.predict(job_a, "a photo of sks robot toy", 0, 1.0, api_name="/sample")
    assert (app.workspace / "jobs" / job_a).is_dir()  # bob's delete did not touch it


def _get(app, client, path: str) -> httpx.Response:
    return httpx.get(app.url + "gradio_api/file=" + path, cookies=client.cookies, timeout=30)


def test_served_files_go_to_their_user_only_and_not_past_a_restart(launch, tiny_model_dir, tmp_path):
    """Alice's zip and photos, fetched by their URL: only she gets the zip; nobody gets an upload back;
    after a restart the old URL serves nothing."""
    workspace = tmp_path / "workspace"
    args = ("--auth", "alice:wonderland", "--auth", "bob:builder")
    app = launch(*args, workspace=workspace)
    alice, bob = app.client(auth=("alice", "wonderland")), app.client(auth=("bob", "builder"))
    job = alice.predict([gradio_client.handle_file(p) for p in demo_images()], tiny_settings(tiny_model_dir, max_train_steps=2),
                        api_name="/create_job")
    assert wait_for(alice, job)["state"] == "done"
    served = alice.predict(job, "zip", api_name="/download")  # the client's own download of it
    path = next((app.workspace / ".gradio" / "served").rglob("*-lora.zip"))
    assert Path(served).read_bytes() == path.read_bytes()
    assert _get(app, alice, str(path)).status_code == 200
    refused = _get(app, bob, str(path))
    assert refused.status_code == 403 and b"PK" not in refused.content  # the zip, by its URL, to another login
    assert httpx.get(app.url + "gradio_api/file=" + str(path)).status_code in (401, 403)  # and to no login

    with httpx.Client(base_url=app.url, cookies=alice.cookies) as http:  # a photo alice uploads
        uploaded = http.post("gradio_api/upload", files={"files": ("face.png", demo_images()[0].read_bytes(), "image/png")})
    photo = uploaded.json()[0]
    assert _get(app, bob, photo).status_code == 403 and _get(app, alice, photo).status_code == 403  # uploads go back to no one

    app.kill(signal.SIGKILL)
    app = launch(*args, workspace=workspace)
    alice = app.client(auth=("alice", "wonderland"))
    assert not path.exists() and _get(app, alice, str(path)).status_code in (403, 404)  # nothing survives a restart
