"""Files the app serves: per-user copies (another login gets 403), one copy per content however
often a page shows it, swept when old, gone after a restart; a page watching a job for 30 minutes
leaves a few hundred kB in Gradio's folder. (Two logins against a running app: test_two_users.py.)"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest
from PIL import Image

from adaprelora_diffusion.engine.lock import try_lock
from app import jobs
from app.events import EventLog
from app.served import ServedFiles, user_key
from app.service import JobService
from app.uploads import UploadLimits
from app.workspace import Workspace

gr = pytest.importorskip("gradio")


def _noise(path, seed: int, size: int = 64) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_copies_are_per_user_one_per_content_swept_when_old_and_reset(tmp_path):
    served = ServedFiles(tmp_path / ".gradio", max_age=100)
    source = tmp_path / "a.png"
    _noise(source, 0)
    alice = served.serve("alice", source)
    assert served.serve("alice", source) == alice  # the same content: the same copy
    bob = served.serve("bob", source)
    assert bob != alice and f"/served/{user_key('bob')}/" in bob
    assert served.may_serve("alice", alice) and not served.may_serve("bob", alice) and not served.may_serve(None, alice)
    assert served.may_serve("alice", str(tmp_path / ".gradio" / "served" / user_key("alice") / ".." / user_key("bob"))) is False
    upload = tmp_path / ".gradio" / "0123abcd" / "photo.png"  # where Gradio keeps an upload
    upload.parent.mkdir()
    _noise(upload, 1)
    assert served.may_serve("alice", str(upload)) is False  # raw uploads go back to nobody
    assert served.may_serve("alice", "/etc/passwd") is None  # not ours: Gradio's own rules apply

    leftover = tmp_path / ".gradio" / "tmpab12cd"  # what gr.File leaves per photo it reads
    leftover.touch()
    old = time.time() - 200
    os.utime(leftover, (old, old))
    os.utime(os.path.dirname(bob), (old, old))
    served.sweep()
    assert not os.path.exists(bob) and os.path.exists(alice) and not leftover.exists()
    served.reset()
    assert list((tmp_path / ".gradio").iterdir()) == []


def test_a_30_minute_watch_sends_each_image_once_and_leaves_little_on_disk(tmp_path):
    """1800 ticks of the page's live view (1 Hz for 30 minutes) through Gradio's own request
    processing, on a job that trains all along and writes 4 validation images every 5 minutes."""
    from gradio.state_holder import SessionState

    from app.ui import build_ui

    ws = Workspace.open(tmp_path / "ws")
    os.environ["GRADIO_TEMP_DIR"] = str(ws.gradio_dir)
    service = JobService(ws, [ws.models_dir], UploadLimits())
    job_id = ws.new_job_id()
    folder = ws.jobs_dir / job_id
    folder.mkdir()
    jobs.write_job(folder, {"id": job_id, "owner": "", "name": "watched", "train": {"max_train_steps": 1800,
                                                                                      "instance_prompt": "a photo"}})
    jobs.update_state(folder, state="running", pid=os.getpid())
    held = try_lock(jobs.lock_path(folder))  # the job's worker is alive
    events = EventLog(folder / "events.jsonl")
    demo = build_ui(service)
    fns = {}
    for f in demo.fns.values():
        fns.setdefault(f.name, f)  # the first live_view is the timer's (the second, the job picker's)
    state, request = SessionState(demo), gr.Request(username=None)

    async def watch() -> int:
        await demo.process_api(fns["on_load"], [""], state=state, request=request)
        shown, galleries = None, 0
        for tick in range(1800):
            events.write("step", step=tick + 1, max_steps=1800, loss=1.0 / (tick + 1))
            if tick % 300 == 0:  # a validation: 4 new images
                step_dir = folder / "output" / "validation" / f"step-{tick:06d}"
                step_dir.mkdir(parents=True)
                for i in range(4):
                    _noise(step_dir / f"{i:02d}.png", tick + i)
            out = await demo.process_api(fns["live_view"], [job_id, shown], state=state, request=request)
            shown = out["data"][8]
            gallery = out["data"][2]
            if not (isinstance(gallery, dict) and gallery.get("__type__") == "update"):
                galleries += 1
                assert [c["caption"].split(" #")[0] for c in gallery][:1] == [f"step {tick - tick % 300}"]  # newest first
        return galleries

    try:
        galleries = asyncio.run(watch())
    finally:
        os.close(held)
    assert galleries == 6  # once per new validation, not once a tick
    files = [p for p in ws.gradio_dir.rglob("*") if p.is_file()]
    assert len(files) == 6 * 4  # each image copied once
    size = service.served.size_bytes()
    print(f"\nafter a simulated 30-minute watch: {len(files)} files, {size / 1e3:.0f} kB in {ws.gradio_dir}")
    assert size < 2_000_000
