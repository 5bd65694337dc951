"""Launching the app as a user would (``python -m app``) on the tiny pipeline, and cleaning up after it.

Workers are started in their own session so that they outlive the app; every fixture that
launches an app therefore also kills the workers its workspace still has, by pid, at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaprelora_diffusion.engine.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DEMO_SUBJECT = ROOT / "adaprelora_diffusion" / "demo" / "assets" / "demo_subject"

gradio_client = pytest.importorskip("gradio_client", reason="the web app's tests need the [app] and [test] extras")


def app_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.pop("ADAPRELORA_APP_AUTH", None)
    env.update(extra)
    return env


class RunningApp:
    """One ``python -m app`` process on a free loopback port."""

    def __init__(self, workspace: Path, model_dir: Path, *args: str, env: dict | None = None):
        self.workspace, self.model_dir, self.args, self.env = workspace, model_dir, args, env or app_env()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = workspace.parent / f"app-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> RunningApp:
        cmd = [sys.executable, "-m", "app", "--workspace", str(self.workspace), "--model-dir", str(self.model_dir),
               "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, cwd=self.workspace.parent, env=self.env, stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT)
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "gradio_api/info", timeout=2).status_code in (200, 401):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the app did not answer within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def client(self, auth: tuple[str, str] | None = None):
        return gradio_client.Client(self.url, auth=auth, verbose=False,
                                    download_files=str(self.workspace.parent / "client-downloads"))


def kill_workers(workspace: Path) -> None:
    """SIGKILL every live worker of the workspace (each leads its own process group), by its recorded pid."""
    from app.jobs import read_state, worker_alive

    for job_dir in (workspace / "jobs").glob("*"):
        pid = read_state(job_dir).get("pid")
        if pid and worker_alive(job_dir):
            try:
                os.killpg(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_pipeline_dir) -> Path:
    """A model folder holding the tiny random pipeline (the folder named ``tiny-sd``)."""
    return Path(tiny_pipeline_dir).parent


@pytest.fixture
def launch(tmp_path, tiny_model_dir, request):
    """launch(*args) -> a started RunningApp in this test's own workspace; all stopped at the end."""
    started: list[RunningApp] = []
    request.node.running_apps = started

    def _launch(*args: str, workspace: Path | None = None, env: dict | None = None) -> RunningApp:
        app = RunningApp(workspace or tmp_path / "workspace", tiny_model_dir, *args, env=env)
        started.append(app)
        return app.start()

    yield _launch
    for app in started:
        app.kill()
    for workspace in {a.workspace for a in started}:
        kill_workers(workspace)


class Hold:
    """The workers' test hook (app.worker.HOLD_ENV): ``hold.at(3)`` makes every job wait after step 3,
    ``hold.at(11, job_id)`` only that job (``None``: not at all), ``hold.release()`` lets all go on. Tests
    hold a job at a known step instead of racing it, so they do not depend on the machine's speed."""

    def __init__(self, path: Path):
        self.path = path

    def at(self, step: int | None, job_id: str = "*") -> None:
        holds = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.path.write_text(json.dumps({**holds, job_id: step}))

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def env(self, **extra: str) -> dict[str, str]:
        from app.worker import HOLD_ENV

        return app_env(**{HOLD_ENV: str(self.path)}, **extra)


@pytest.fixture
def hold(tmp_path):
    h = Hold(tmp_path / "hold.json")
    yield h
    h.release()


@pytest.fixture(scope="session")
def shared_hold(tmp_path_factory) -> Hold:
    return Hold(tmp_path_factory.mktemp("hold") / "hold.json")


@pytest.fixture(scope="session")
def shared_app_process(tmp_path_factory, tiny_model_dir, shared_hold):
    """One app for the tests that need no login and no restart (jobs queue one after another)."""
    root = tmp_path_factory.mktemp("shared")
    app = RunningApp(root / "workspace", tiny_model_dir, "--max-file-mb", "2", "--max-upload-mb", "5",
                     env=shared_hold.env()).start()
    yield app
    app.kill()
    kill_workers(app.workspace)


@pytest.fixture
def shared_app(shared_app_process, shared_hold, request):
    """The shared app, idle when the test ends: a job a failed test left behind (or held: holds name every
    job) must not hold up the next test's jobs, so each test's failure stays its own."""
    request.node.running_apps = [shared_app_process]
    yield shared_app_process
    shared_hold.release()
    if not wait_idle(shared_app_process.workspace, timeout=240):
        kill_workers(shared_app_process.workspace)
        wait_idle(shared_app_process.workspace, timeout=30)


def wait_idle(workspace: Path, timeout: float) -> bool:
    """True once no job of the workspace is queued or running (within ``timeout`` seconds)."""
    from app.jobs import read_state as job_state

    deadline = time.time() + timeout
    while time.time() < deadline:
        states = {job_state(d).get("state") for d in (workspace / "jobs").glob("*") if d.is_dir()}
        if not states & {"queued", "running"}:
            return True
        time.sleep(0.5)
    return False


def logs_of(app: RunningApp, chars: int = 3000) -> str:
    """The app's log and each job's state and log, ends only: what a failed app test needs to be understood."""
    parts = [f"--- app log {app.log}\n{app.log.read_text(errors='replace')[-chars:] if app.log.is_file() else '(none)'}"]
    for job_dir in sorted((app.workspace / "jobs").glob("*")):
        for name in ("state.json", "log.txt"):
            path = job_dir / name
            if path.is_file():
                parts.append(f"--- {job_dir.name}/{name}\n{path.read_text(errors='replace')[-chars:]}")
    return "\n".join(parts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that ran an app gets the app's and its workers' logs in its report (CI keeps nothing else)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when == "call":
        for app in getattr(item, "running_apps", []):
            report.sections.append(("app and worker logs", logs_of(app)))


def demo_images() -> list[Path]:
    return sorted(DEMO_SUBJECT.glob("*.png"))


def tiny_settings(tiny_model_dir: Path, **overrides) -> dict:
    """A few steps of the tiny random pipeline at 64 px: seconds of training."""
    return {"pretrained_model_name_or_path": str(tiny_model_dir / "tiny-sd"), "class_word": "robot toy",
            "max_train_steps": 8, "checkpointing_steps": 4, "validation_steps": 4, **overrides}


def wait_for(client, job_id: str, states=("done", "failed", "stopped"), timeout: float = 240, until=None) -> dict:
    deadline = time.time() + timeout
    status = {}
    while time.time() < deadline:
        status = client.predict(job_id, api_name="/job_status")
        if status["state"] in states or (until is not None and until(status)):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {status} after {timeout}s")


def read_state(workspace: Path, job_id: str) -> dict:
    return json.loads((workspace / "jobs" / job_id / "state.json").read_text())
