"""What a person sees when something fails (one sentence; the traceback in the job's log), and a
photo set with one photo the app cannot use: the page leaves it out by name, the API refuses."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app import jobs
from app.errors import AppError
from app.service import JobService
from app.uploads import UploadLimits
from app.workspace import Workspace

from .conftest import demo_images

gr = pytest.importorskip("gradio")


@pytest.fixture
def service(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setattr("app.service.start_next", lambda *a, **k: None)  # queue only: no worker starts here
    ws = Workspace.open(tmp_path / "ws")
    return JobService(ws, [tiny_model_dir], UploadLimits(max_file_mb=2))


def _job(service: JobService, owner: str = "alice") -> str:
    job_id = service.ws.new_job_id()
    folder = service.ws.jobs_dir / job_id
    folder.mkdir()
    jobs.update_state(folder, state="done")
    jobs.write_job(folder, {"id": job_id, "owner": owner, "name": "x", "train": {}})
    return job_id


def test_an_unexpected_error_is_one_sentence_and_its_traceback_goes_to_the_jobs_log(service):
    from app.ui import _handled

    job_id = _job(service)

    @_handled(service, "Sampling")
    def sample(job_id, request: gr.Request):
        {}.get("x")["y"]  # a bug, as deep in a library as any

    with pytest.raises(gr.Error) as raised:
        sample(job_id, gr.Request(username="alice"))
    assert raised.value.message == ("Sampling failed (TypeError: 'NoneType' object is not subscriptable); the job's log "
                                    "(Training tab) has the details. Try again; if it fails again, report it with that log.")
    log = (service.ws.jobs_dir / job_id / "log.txt").read_text()
    assert "ERROR app: Sampling failed:" in log and "Traceback (most recent call last)" in log and 'in sample' in log

    with pytest.raises(gr.Error, match="the app's log has the details"):  # another user's job: nothing of theirs is touched
        sample(job_id, gr.Request(username="bob"))
    assert (service.ws.jobs_dir / job_id / "log.txt").read_text() == log

    @_handled(service, "Sampling")
    def refused(job_id, request: gr.Request):
        raise AppError("Write a prompt.")

    with pytest.raises(gr.Error) as raised:  # refused input: its own sentence, nothing logged
        refused(job_id, gr.Request(username="alice"))
    assert raised.value.message == "Write a prompt."


def test_one_oversized_photo_is_left_out_by_name_on_the_page_and_refused_by_the_api(service, tmp_path, tiny_model_dir):
    big = tmp_path / "big.png"  # 3.2 MB: over the 2 MB per-file limit
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(big)
    files = [(p.name, p) for p in demo_images()[:3]] + [("big.png", big)]
    settings = {"pretrained_model_name_or_path": "tiny-sd", "class_word": "robot toy"}
    report = service.check_upload(files, settings)
    page = report.as_markdown(leave_out_refused=True)
    assert "**3 of 4 file(s) usable.**" in page and "- **Left out:** big.png: 3.2 MB is over the 2 MB limit per file" in page
    with pytest.raises(AppError, match="big.png: 3.2 MB is over the 2 MB limit per file"):
        service.create_job(files, settings, "alice")
    job_id = service.create_job(files, settings, "alice", leave_out_refused=True)
    job = jobs.read_job(service.ws.jobs_dir / job_id)
    assert [i["name"] for i in job["images"]] == [p.name for p in demo_images()[:3]]
    assert any(w.startswith("Left out: big.png: 3.2 MB") for w in job["warnings"])
    assert service.job_status(job_id, "alice")["state"] == "queued"


def test_intervals_end_at_the_last_step_and_cpu_presets_skip_the_step_0_samples(tiny_model_dir, monkeypatch):
    import torch

    from app.settings import parse_settings

    parsed = parse_settings({"max_train_steps": 150}, [tiny_model_dir])
    assert parsed.train["validation_steps"] == parsed.train["checkpointing_steps"] == 38  # 38, 76, 114, then 150
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_settings({}, [tiny_model_dir]).train["skip_initial_validation"] is True
    assert parse_settings({"skip_initial_validation": False}, [tiny_model_dir]).train["skip_initial_validation"] is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "skip_initial_validation" not in parse_settings({}, [tiny_model_dir]).train


def test_the_advanced_panel_has_every_adaprelora_setting_and_the_job_its_command(service, tiny_model_dir):
    from adaprelora_diffusion.dreambooth.config import parse_config
    from adaprelora_diffusion.optim import ADAPRELORA_SETTINGS
    from app.ui import _adaprelora_values, adaprelora_inputs

    with gr.Blocks():
        fields = adaprelora_inputs()
    assert [f.label for f in fields] == [s.flag for s in ADAPRELORA_SETTINGS]
    assert [f.info for f in fields] == [s.help for s in ADAPRELORA_SETTINGS]
    values = [f.value for f in fields]
    assert _adaprelora_values(values) == {}  # untouched: nothing sent, the trainer's defaults apply
    values[[s.name for s in ADAPRELORA_SETTINGS].index("balance")] = 0.25
    values[[s.name for s in ADAPRELORA_SETTINGS].index("clip_threshold")] = 0  # "off", as on the command line
    chosen = _adaprelora_values(values)
    assert chosen == {"adaprelora_balance": 0.25, "adaprelora_clip_threshold": 0}

    files = [(p.name, p) for p in demo_images()[:3]]
    job_id = service.create_job(files, {"pretrained_model_name_or_path": "tiny-sd", "rank": 8, **chosen}, "alice")
    command = service.job_view(job_id, "alice")["command"]
    assert command.startswith("python train_dreambooth.py --pretrained_model_name_or_path ")
    import shlex

    config = parse_config(shlex.split(command)[2:])
    train = jobs.read_job(service.ws.jobs_dir / job_id)["train"]
    assert config.rank == 8 and config.adaprelora_balance == 0.25 and config.adaprelora_clip_threshold is None
    assert config.instance_prompt == train["instance_prompt"] and config.instance_data_dir == "./photos"
    assert config.max_train_steps == train["max_train_steps"] and config.checkpointing_steps == train["checkpointing_steps"]
    with pytest.raises(AppError, match=r"--adaprelora_balance must be in \[0, 1\], got 2"):
        service.create_job(files, {"pretrained_model_name_or_path": "tiny-sd", "adaprelora_balance": 2}, "alice")


def test_refresh_lists_models_added_since_the_start_and_picking_one_says_what_it_sets(service, tmp_path,
                                                                                       tiny_sdxl_pipeline_dir):
    """Through Gradio's own request processing, as the page's Refresh button and model picker call them."""
    import asyncio
    import shutil

    from gradio.state_holder import SessionState

    from app.ui import build_ui

    models = service.model_dirs[0]
    demo = build_ui(service)
    fns = {}
    for f in demo.fns.values():
        fns.setdefault(f.name, f)
    state, request = SessionState(demo), gr.Request(username="alice")

    async def call(name, *inputs):
        return (await demo.process_api(fns[name], list(inputs), state=state, request=request))["data"]

    added = shutil.copytree(tiny_sdxl_pipeline_dir, models / "my-sdxl")
    (added / "adaprelora_model.json").unlink()  # an ordinary SDXL folder: its own 1024 px
    try:
        _, model_update = asyncio.run(call("refresh_lists", None, "default"))
        assert str(added) in [value for _, value in model_update["choices"]]
        lr, steps, resolution, rank, _, note = asyncio.run(call("fill_advanced", "object", str(added)))
        assert (resolution, steps, rank) == (1024, 500, 16)
        assert "an SDXL model" in note and "**1024 px** for **500 steps**" in note and "checked against 1024 px" in note
    finally:
        shutil.rmtree(added)


def test_the_advanced_fields_start_at_the_default_models_values_and_no_page_event_overwrites_them(service):
    """A value typed into Steps before a page-load event returned was lost (the event wrote the defaults over
    it): the defaults are the fields' own initial values, and no load event writes to a field a person edits."""
    from adaprelora_diffusion.dreambooth.model_loading import model_defaults, resolve_model_source
    from app.models import DEFAULT_MODEL, resolve_model
    from app.presets import preset_values
    from app.ui import build_ui

    demo = build_ui(service)
    by_label = {getattr(b, "label", None): b for b in demo.blocks.values()}
    source = resolve_model_source(resolve_model(DEFAULT_MODEL, service.model_dirs))[1]
    values = preset_values("object", model_defaults(source, sdxl=False))
    assert by_label["Steps"].value == values["max_train_steps"] and by_label["Learning rate"].value == values["learning_rate"]
    assert by_label["LoRA rank"].value == values["rank"] and by_label["Resolution"].value > 0
    editable = {id(b) for b in demo.blocks.values() if getattr(b, "interactive", None) is not False and getattr(b, "label", None)}
    for fn in demo.fns.values():
        if any(event == "load" for _, event in fn.targets):
            assert not [o.label for o in fn.outputs if id(o) in editable and isinstance(o, (gr.Number, gr.Textbox))], fn.name
