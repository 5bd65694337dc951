"""Two logged-in users at once: both jobs complete, one after the other, and each sees only their own."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
