"""Hostile input against a running app: every attempt is refused with a message that names the
problem, and nothing is written outside the workspace."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import demo_images, tiny_settings

gradio_client = pytest.importorskip("gradio_client")
handle_file = gradio_client.handle_file


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def outside(tmp_path):
    """A folder beside nothing of the app's: it must stay empty."""
    folder = tmp_path / "outside"
    folder.mkdir()
    yield folder
    assert list(folder.rglob("*")) == [], "something was written outside the workspace"


def _refused(client, files, settings, match: str) -> None:
    with pytest.raises(Exception, match=match):
        client.predict([handle_file(str(p)) for p in files], settings, api_name="/create_job")


def test_bad_files_are_refused_by_what_they_are(shared_app, tiny_model_dir, outside, tmp_path):
    client = shared_app.client()
    settings = tiny_settings(tiny_model_dir)
    fake = tmp_path / "holiday.png"
    fake.write_bytes(b"#!/bin/sh\necho not an image\n")
    _refused(client, [*demo_images(), fake], settings, r"holiday.png: is not a readable image")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(100_000, 100_000))
    _refused(client, [*demo_images(), bomb], settings, r"bomb.png: claims too many pixels \(a possible decompression bomb")
    gif = tmp_path / "renamed.jpg"
    Image.new("RGB", (80, 80), "red").save(gif, format="GIF")
    _refused(client, [*demo_images(), gif], settings, r"renamed.jpg: is a GIF image; upload jpg, png or webp")


def test_oversized_uploads_are_refused(shared_app, tiny_model_dir, tmp_path, outside):
    client = shared_app.client()
    rng = np.random.default_rng(0)
    big = tmp_path / "big.png"  # 3.2 MB of noise: over the app's --max-file-mb 2, under its 5 MB set limit
    Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(big)
    # the upload reaches the app (one oversized photo must not sink the others on the page), which names it
    _refused(client, [*demo_images(), big], tiny_settings(tiny_model_dir), r"big.png: 3.2 MB is over the 2 MB limit per file")
    huge = tmp_path / "huge.png"  # ~6 MB: over the whole set's limit, which Gradio enforces at upload
    Image.fromarray(rng.integers(0, 255, (1450, 1450, 3), dtype=np.uint8)).save(huge)
    _refused(client, [huge], tiny_settings(tiny_model_dir), r"exceeds the maximum file size of 5242880 bytes")
    with httpx.Client(base_url=shared_app.url) as http:  # and the server itself, for clients that do not check first
        response = http.post("gradio_api/upload", files={"files": ("huge.png", huge.read_bytes(), "image/png")})
    assert response.status_code == 413 and "maximum" in response.text.lower(), (response.status_code, response.text[:200])
    parts = []  # each under 2 MB, together over the 5 MB set limit
    for i in range(4):
        part = tmp_path / f"part{i}.png"
        Image.fromarray(rng.integers(0, 255, (760, 760, 3), dtype=np.uint8)).save(part)
        parts.append(part)
    _refused(client, parts, tiny_settings(tiny_model_dir), r"add up to \d+ MB, over the 5 MB limit")


def test_paths_in_captions_file_names_settings_and_job_ids_are_refused(shared_app, tiny_model_dir, outside):
    client = shared_app.client()
    images = demo_images()
    _refused(client, images, tiny_settings(tiny_model_dir, captions={"../../outside/evil.png": "x"}),
             r"captions'\] names file\(s\) that were not uploaded: '\.\./\.\./outside/evil\.png'")
    _refused(client, images, tiny_settings(tiny_model_dir, captions={"bolt_01_front.png": "line one\n../../evil"}),
             r"must be one line")
    _refused(client, images, tiny_settings(tiny_model_dir, output_dir=str(outside)), r"chosen by the app")
    _refused(client, images, tiny_settings(tiny_model_dir, pretrained_model_name_or_path=str(tiny_model_dir / ".." / ".." / "etc")),
             r"neither the embedded default, a model in a model folder")
    _refused(client, images, tiny_settings(tiny_model_dir, pretrained_model_name_or_path="/etc/passwd"),
             r"neither the embedded default, a model in a model folder")
    _refused(client, images, tiny_settings(tiny_model_dir, trigger_word="../x"), r"trigger_word.*is not allowed")

    for bad_id in ("../../etc/passwd", "/etc/passwd", "20260101-120000-1a2b3c4d/../../x", "", "20260101-120000-1a2b3c4d"):
        for endpoint in ("/job_status", "/stop_job", "/resume_job", "/delete_job"):
            with pytest.raises(Exception, match="Unknown job id"):
                client.predict(bad_id, api_name=endpoint)
        with pytest.raises(Exception, match="Unknown job id"):
            client.predict(bad_id, "zip", api_name="/download")
        with pytest.raises(Exception, match="Unknown job id"):
            client.predict(bad_id, "a photo", 0, 1.0, api_name="/sample")


def test_a_hostile_upload_name_never_becomes_a_path(shared_app, tiny_model_dir, outside):
    """A multipart upload named ../../outside/evil.png: Gradio keeps it in its own folder, the job
    stores it under a name the app makes."""
    raw = demo_images()[0].read_bytes()
    with httpx.Client(base_url=shared_app.url) as http:
        uploaded = http.post("gradio_api/upload", files={"files": (f"../../{outside.name}/evil.png", raw, "image/png")}).json()
    stored = Path(uploaded[0])
    assert shared_app.workspace / ".gradio" in stored.parents
    client = shared_app.client()
    files = [handle_file(str(p)) for p in demo_images()[1:]]
    job = client.predict(files + [{"path": str(stored), "meta": {"_type": "gradio.FileData"}, "orig_name": "evil.png"}],
                         tiny_settings(tiny_model_dir, max_train_steps=1), api_name="/create_job")
    names = sorted(p.name for p in (shared_app.workspace / "jobs" / job / "uploads").iterdir())
    assert names[-1].startswith("005_") and names[-1].endswith(".png") and ".." not in "".join(names)
    client.predict(job, api_name="/delete_job")


def test_files_outside_gradio_folder_and_a_job_files_are_never_served(shared_app, tiny_model_dir, outside):
    client = shared_app.client()
    job = client.predict([handle_file(str(p)) for p in demo_images()], tiny_settings(tiny_model_dir, max_train_steps=1),
                         api_name="/create_job")
    job_dir = shared_app.workspace / "jobs" / job
    upload = next((job_dir / "uploads").iterdir())
    probes = ["/etc/passwd", "../../../../../../etc/passwd", "..%2f..%2f..%2f..%2fetc%2fpasswd", "%2fetc%2fpasswd",
              "/proc/self/environ", str(job_dir / "job.json"), str(upload), str(shared_app.workspace / ".jobs.lock")]
    with httpx.Client(base_url=shared_app.url) as http:
        for probe in probes:
            for route in ("gradio_api/file=", "file=", "gradio_api/file/"):
                response = http.get(route + probe)
                assert response.status_code in (403, 404), (route, probe, response.status_code)
                assert b"root:" not in response.content and b"PATH=" not in response.content

        # a FileData pointing at a server file is not an upload: Gradio refuses it before our code runs
        event = http.post("gradio_api/call/create_job", json={"data": [[
            {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}], tiny_settings(tiny_model_dir)]}).json()
        stream = http.get(f"gradio_api/call/create_job/{event['event_id']}").text
    assert "event: error" in stream and "/etc/passwd" not in json.dumps(client.predict(api_name="/list_jobs"))
    with pytest.raises(Exception, match="Unknown download"):
        client.predict(job, "../../etc/passwd", api_name="/download")
    client.predict(job, api_name="/delete_job")
