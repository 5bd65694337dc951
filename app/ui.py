"""The page and the named API endpoints, wired onto ``JobService`` with Gradio's own pieces.

Nothing here trains or waits for training: every handler reads or writes job folders and
returns at once, so a closed tab, a reload or an app restart never touches a run. The page
reconnects by itself: the browser remembers the selected job (``gr.BrowserState``) and a
``gr.Timer`` refreshes the live view from the job's files.

API endpoints (``gradio_client``): create_job, job_status, stop_job, resume_job, delete_job,
list_jobs, sample, download (payloads in docs/app.md). File inputs and outputs go through
hidden components, so Gradio itself checks that an input file was uploaded to it and serves
outputs from its own folder; the page's own handlers are private (not callable by clients).
"""

from __future__ import annotations

import functools
import html
import json
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from adaprelora_diffusion.dreambooth.model_loading import model_defaults, resolve_model_source
from adaprelora_diffusion.optim import OPTIMIZERS

from .captions import suggest_caption
from .errors import AppError
from .models import DEFAULT_MODEL, model_choices, resolve_model
from .presets import PRESETS, instance_prompt_for, preset_values
from .sampling import FINAL, SampleRequest
from .service import JobService

__all__ = ["build_ui", "CSS"]

CSS = """
.arl-track {background: var(--neutral-200); border-radius: 6px; height: 18px; overflow: hidden;}
.arl-bar {background: var(--color-accent); height: 18px; transition: width .5s;}
.arl-line {margin-top: 6px; font-size: 15px;}
"""
PRIVATE = {"api_visibility": "private"}


def _user(request: gr.Request | None) -> str:
    return (getattr(request, "username", None) or "") if request is not None else ""


def _plain_errors(fn):
    """AppError -> gr.Error: the person sees the sentence, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AppError as err:
            raise gr.Error(str(err), print_exception=False) from err
    return wrapper


def _files(value: Any) -> list[tuple[str, Path]]:
    """Gradio's uploaded files as (the client's file name, where Gradio stored it)."""
    out = []
    for item in value or []:
        path = Path(item if isinstance(item, str) else getattr(item, "path", item.get("path") if isinstance(item, dict) else item))
        out.append((path.name, path))
    return out


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def progress_html(status: dict[str, Any] | None) -> str:
    if not status:
        return "<div class='arl-line'>No job selected: create one in <b>New job</b>, or pick one above.</div>"
    step, total = status.get("step") or 0, status.get("max_steps") or 0
    pct = 100 if status["state"] == "done" else (round(100 * step / total) if total else 0)
    parts = [f"<b>{status['state']}</b>", f"step {step}/{total or '?'}"]
    if status.get("loss") is not None:
        parts.append(f"loss {status['loss']:.4f}")
    if status["state"] == "running":
        parts.append(f"ETA {_eta(status.get('eta_seconds'))}")
    if status.get("queue_position"):
        parts.append(f"position {status['queue_position']} in the queue")
    error = f"<div class='arl-line' style='color:var(--error-text-color)'>{html.escape(status['error'])}</div>" \
        if status.get("error") else ""
    return (f"<div class='arl-track'><div class='arl-bar' style='width:{pct}%'></div></div>"
            f"<div class='arl-line' id='arl-status'>{' · '.join(parts)}</div>{error}")


def _job_choices(service: JobService, user: str) -> list[tuple[str, str]]:
    return [(f"{j['name']} · {j['state']} · {j['job_id']}", j["job_id"]) for j in service.list_jobs(user)]


def _advanced_defaults(preset: str, model: str, model_dirs) -> tuple:
    """The values a preset gives the advanced fields for this model (shown, so nothing is hidden)."""
    try:
        source = resolve_model_source(resolve_model(model, model_dirs))[1]
    except (AppError, ValueError):
        return (gr.skip(),) * 5
    recommended = model_defaults(source)
    values = preset_values(preset, recommended)
    steps = values["max_train_steps"]
    return (values["learning_rate"], steps, recommended.get("resolution", 512), values["rank"], None)


def build_ui(service: JobService) -> gr.Blocks:
    model_dirs = service.model_dirs
    with gr.Blocks(title="adaprelora · LoRA trainer", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        remembered = gr.BrowserState("", storage_key="adaprelora-selected-job")
        gr.Markdown("# adaprelora · teach Stable Diffusion a subject\nDrop in 3-30 photos, name the subject, press "
                    "**Train**. Training runs on the server: close the tab and come back later.")
        with gr.Row():
            job = gr.Dropdown(label="Job", choices=[], value=None, interactive=True, scale=5, elem_id="job-select")
            refresh = gr.Button("↻ Refresh", scale=0, min_width=100)

        with gr.Tabs(selected="new") as tabs:
            with gr.Tab("1 · New job", id="new"):
                photos = gr.File(label="Photos of the subject (3-30; jpg, png or webp)", file_count="multiple",
                                 file_types=[".jpg", ".jpeg", ".png", ".webp"], elem_id="photos")
                report = gr.Markdown("Add 3-30 photos of the subject (jpg, png or webp).", elem_id="check-report")
                thumbs = gr.Gallery(label="Uploaded", columns=8, height=170, allow_preview=False, show_label=True)
                captions = gr.Dataframe(headers=["file", "caption"], datatype=["str", "str"], column_count=2,
                                        static_columns=[0], interactive=True, label="Captions (edit the caption column; empty: the instance prompt, 'a photo of <trigger> <class>')")
                suggest = gr.Button("Suggest captions", size="sm")
                with gr.Row():
                    trigger = gr.Textbox("sks", label="Trigger word", info="a rare word that will mean your subject")
                    class_word = gr.Textbox("object", label="Class word", info="what it is: dog, person, robot toy ...")
                    name = gr.Textbox(label="Job name", placeholder="(trigger + class)")
                with gr.Row():
                    preset = gr.Radio(list(PRESETS), value="object", label="Preset")
                    model = gr.Dropdown(choices=model_choices(model_dirs), value=DEFAULT_MODEL, allow_custom_value=True,
                                        label="Base model", info="a local model, or a Hub id owner/name (online only)")
                with gr.Accordion("Advanced (the trainer's flags)", open=False):
                    with gr.Row():
                        optimizer = gr.Dropdown(list(OPTIMIZERS), value="adaprelora", label="Optimizer")
                        lr = gr.Number(label="Learning rate")
                        steps = gr.Number(label="Steps", precision=0)
                        resolution = gr.Number(label="Resolution", precision=0)
                    with gr.Row():
                        rank = gr.Number(label="LoRA rank", precision=0)
                        ckpt_every = gr.Number(label="Checkpoint every N steps (empty: 4 per run)", precision=0)
                        seed = gr.Number(0, label="Seed", precision=0)
                    extra = gr.Textbox(label="Other flags as JSON", placeholder='{"lora_alpha": 8, "random_flip": true}')
                train_btn = gr.Button("Train", variant="primary", elem_id="train-button")

            with gr.Tab("2 · Training", id="training"):
                progress = gr.HTML(progress_html(None), elem_id="progress")
                with gr.Row():
                    stop_btn = gr.Button("Stop (saves a checkpoint)", size="sm")
                    resume_btn = gr.Button("Resume", size="sm")
                    delete_btn = gr.Button("Delete job", size="sm", variant="stop")
                with gr.Row():
                    loss_plot = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss", title="Loss",
                                            height=260, elem_id="loss-plot")
                    samples = gr.Gallery(label="Validation samples", columns=4, height=260, object_fit="contain", elem_id="samples")
                log = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, elem_id="log")
                notes = gr.Markdown()

            with gr.Tab("3 · Sample", id="sample"):
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", scale=3)
                    negative = gr.Textbox(label="Negative prompt", scale=2)
                with gr.Row():
                    s_seed = gr.Number(0, label="Seed", precision=0)
                    s_steps = gr.Number(0, label="Sampling steps (0: as in training)", precision=0)
                    guidance = gr.Slider(0, 15, value=7.5, step=0.5, label="Guidance")
                    scale = gr.Slider(-1, 2, value=1.0, step=0.1, label="LoRA scale")
                    checkpoint = gr.Dropdown([FINAL], value=FINAL, label="Checkpoint")
                sample_btn = gr.Button("Generate: base vs LoRA", variant="primary", elem_id="sample-button")
                pair = gr.Gallery(label="Base model | with the LoRA (same seed)", columns=2, height=None, object_fit="contain",
                                  elem_id="pair")
                with gr.Accordion("Grid: checkpoints x LoRA scales", open=False):
                    grid_ckpts = gr.CheckboxGroup([], label="Checkpoints")
                    grid_scales = gr.Textbox("0, 0.5, 1", label="LoRA scales")
                    grid_btn = gr.Button("Make the grid")
                    grid_img = gr.Image(label="Grid", type="filepath")

            with gr.Tab("4 · Download", id="download"):
                gr.Markdown("One zip with the diffusers file, the kohya file (AUTOMATIC1111, ComfyUI), the model card and "
                            "the training config; each file on its own below it.")
                dl_btn = gr.Button("Prepare downloads", variant="primary")
                dl_files = gr.File(label="Files", file_count="multiple", elem_id="downloads")

        view_key = gr.State(None)  # what the live view last showed, so unchanged parts are skipped

        # -- handlers ------------------------------------------------------------------------
        def on_load(saved: str, request: gr.Request):
            """Reconnect: the job this browser last looked at (or the newest), on the training tab."""
            choices = _job_choices(service, _user(request))
            ids = [v for _, v in choices]
            chosen = saved if saved in ids else (ids[0] if ids else None)
            return gr.update(choices=choices, value=chosen), gr.Tabs(selected="training" if chosen else "new")

        def refresh_jobs(current: str | None, request: gr.Request):
            choices = _job_choices(service, _user(request))
            return gr.update(choices=choices, value=current if current in [v for _, v in choices] else None)

        @_plain_errors
        def check_photos(files, preset_name, model_value, request: gr.Request):
            pairs = _files(files)
            report_ = service.check_upload(pairs, {"preset": preset_name, "pretrained_model_name_or_path": model_value})
            usable = [i for i in report_.images if i.problem is None]
            return report_.as_markdown(), [(str(i.path), i.name) for i in usable], [[i.name, ""] for i in usable]

        def suggest_captions(files, preset_name, trigger_word, class_name):
            default = instance_prompt_for(preset_name, trigger_word or "sks", class_name or "object")
            return [[n, suggest_caption(str(p), default)] for n, p in _files(files)]

        def fill_advanced(preset_name, model_value):
            return _advanced_defaults(preset_name, model_value, model_dirs)

        @_plain_errors
        def create_from_page(files, caption_rows, preset_name, model_value, trigger_word, class_name, job_name, optimizer_,
                             lr_, steps_, resolution_, rank_, ckpt_, seed_, extra_json, request: gr.Request):
            settings: dict[str, Any] = {"preset": preset_name, "pretrained_model_name_or_path": model_value,
                                        "trigger_word": trigger_word, "class_word": class_name, "optimizer": optimizer_}
            if job_name:
                settings["name"] = job_name
            for key, value in (("learning_rate", lr_), ("max_train_steps", steps_), ("resolution", resolution_),
                               ("rank", rank_), ("checkpointing_steps", ckpt_), ("seed", seed_)):
                if value not in (None, ""):
                    settings[key] = value
            if extra_json and extra_json.strip():
                try:
                    more = json.loads(extra_json)
                except ValueError as err:
                    raise AppError(f"'Other flags' is not valid JSON ({err}): write e.g. {{\"lora_alpha\": 8}}.") from err
                if not isinstance(more, dict):
                    raise AppError("'Other flags' must be a JSON object, e.g. {\"lora_alpha\": 8}.")
                settings = {**more, **settings}
            rows = caption_rows.values.tolist() if isinstance(caption_rows, pd.DataFrame) else (caption_rows or [])
            settings["captions"] = {str(r[0]): str(r[1]) for r in rows if r and r[0] and r[1] and str(r[1]).strip()}
            job_id = service.create_job(_files(files), settings, _user(request))
            choices = _job_choices(service, _user(request))
            return gr.update(choices=choices, value=job_id), job_id, gr.Tabs(selected="training"), None

        def live_view(job_id: str | None, shown, request: gr.Request):
            user = _user(request)
            if not job_id:
                return progress_html(None), gr.skip(), gr.skip(), "", "", gr.skip(), gr.skip(), gr.skip(), None, gr.skip()
            try:
                view = service.job_view(job_id, user)
            except AppError as err:
                return progress_html(None), gr.skip(), gr.skip(), "", str(err), gr.skip(), gr.skip(), gr.skip(), None, gr.skip()
            key = (job_id, view["status"]["state"], len(view["loss"]), tuple(view["samples_key"]), tuple(view["checkpoints"]))
            state_changed = shown is None or shown[:2] != list(key[:2])
            changed = shown != list(key)
            loss = pd.DataFrame(view["loss"], columns=["step", "loss"]) if changed else gr.skip()
            gallery = service.latest_samples(job_id, user) if changed else gr.skip()
            ckpts = view["checkpoints"]
            notes_md = "\n".join(f"- **Check:** {w}" for w in view["warnings"])
            return (progress_html(view["status"]), loss, gallery, view["log"], notes_md,
                    gr.update(choices=ckpts or [FINAL], value=FINAL if FINAL in ckpts else (ckpts[-1] if ckpts else FINAL))
                    if changed else gr.skip(),
                    gr.update(choices=ckpts) if changed else gr.skip(),
                    gr.update(value=view["prompt"]) if changed and shown is None else gr.skip(), list(key),
                    gr.update(choices=_job_choices(service, user)) if state_changed else gr.skip())

        @_plain_errors
        def stop(job_id, request: gr.Request):
            service.stop_job(job_id, _user(request))

        @_plain_errors
        def resume(job_id, request: gr.Request):
            service.resume_job(job_id, _user(request))

        @_plain_errors
        def delete(job_id, request: gr.Request):
            service.delete_job(job_id, _user(request))
            return gr.update(choices=_job_choices(service, _user(request)), value=None), "", None

        @_plain_errors
        def sample_pair(job_id, prompt_, negative_, seed_, steps_, guidance_, scale_, checkpoint_, request: gr.Request):
            request_ = SampleRequest(prompt=prompt_, negative_prompt=negative_ or "", seed=int(seed_ or 0),
                                     steps=int(steps_) or None if steps_ else None, guidance=float(guidance_),
                                     lora_scale=float(scale_), checkpoint=checkpoint_ or FINAL)
            return service.sample(job_id, _user(request), request_)

        @_plain_errors
        def sample_grid(job_id, prompt_, negative_, seed_, steps_, guidance_, ckpts, scales_text, request: gr.Request):
            try:
                scales = [float(s) for s in scales_text.replace(";", ",").split(",") if s.strip()]
            except ValueError as err:
                raise AppError(f"LoRA scales must be numbers separated by commas, e.g. 0, 0.5, 1 ({err}).") from err
            request_ = SampleRequest(prompt=prompt_, negative_prompt=negative_ or "", seed=int(seed_ or 0),
                                     steps=int(steps_) or None if steps_ else None, guidance=float(guidance_))
            return service.sample_grid(job_id, _user(request), request_, list(ckpts or []), scales)

        @_plain_errors
        def downloads(job_id, request: gr.Request):
            return service.download_all(job_id, _user(request))

        demo.load(on_load, [remembered], [job, tabs], **PRIVATE)
        job.change(lambda j: j or "", [job], [remembered], **PRIVATE)
        refresh.click(refresh_jobs, [job], [job], **PRIVATE)
        for trigger_ in (photos.upload, photos.change):
            trigger_(check_photos, [photos, preset, model], [report, thumbs, captions], **PRIVATE)
        suggest.click(suggest_captions, [photos, preset, trigger, class_word], [captions], **PRIVATE)
        for trigger_ in (preset.change, model.change):
            trigger_(fill_advanced, [preset, model], [lr, steps, resolution, rank, ckpt_every], **PRIVATE)
        demo.load(fill_advanced, [preset, model], [lr, steps, resolution, rank, ckpt_every], **PRIVATE)
        preset.change(lambda p: "person" if p == "person" else gr.skip(), [preset], [class_word], **PRIVATE)
        train_btn.click(create_from_page, [photos, captions, preset, model, trigger, class_word, name, optimizer, lr, steps,
                                           resolution, rank, ckpt_every, seed, extra], [job, remembered, tabs, view_key],
                        **PRIVATE)
        live_outputs = [progress, loss_plot, samples, log, notes, checkpoint, grid_ckpts, prompt, view_key, job]
        gr.Timer(1.0).tick(live_view, [job, view_key], live_outputs, concurrency_limit=None, show_progress="hidden", **PRIVATE)
        job.input(live_view, [job, gr.State(None)], live_outputs, concurrency_limit=None, **PRIVATE)
        stop_btn.click(stop, [job], None, **PRIVATE)
        resume_btn.click(resume, [job], None, **PRIVATE)
        delete_btn.click(delete, [job], [job, remembered, view_key], **PRIVATE)
        sample_btn.click(sample_pair, [job, prompt, negative, s_seed, s_steps, guidance, scale, checkpoint], [pair], **PRIVATE)
        grid_btn.click(sample_grid, [job, prompt, negative, s_seed, s_steps, guidance, grid_ckpts, grid_scales], [grid_img],
                       **PRIVATE)
        dl_btn.click(downloads, [job], [dl_files], **PRIVATE)

        _api_endpoints(service)
    return demo


def _api_endpoints(service: JobService) -> None:
    """The scriptable API. Files travel through hidden components so Gradio checks and serves them."""
    with gr.Row(visible=False):
        files_in = gr.File(file_count="multiple")
        settings_in = gr.JSON()
        job_in = gr.Textbox()
        prompt_in = gr.Textbox()
        seed_in = gr.Number(0, precision=0)
        scale_in = gr.Number(1.0)
        negative_in = gr.Textbox("")
        steps_in = gr.Number(0, precision=0)
        guidance_in = gr.Number(7.5)
        checkpoint_in = gr.Textbox(FINAL)
        kind_in = gr.Textbox("zip")
        job_out = gr.Textbox()
        images_out = gr.Gallery()
        file_out = gr.File()
        go = gr.Button()

    @_plain_errors
    def create_job(images, settings, request: gr.Request):
        return service.create_job(_files(images), settings, _user(request))

    @_plain_errors
    def sample(job_id, prompt, seed, lora_scale, negative_prompt, steps, guidance, checkpoint, request: gr.Request):
        request_ = SampleRequest(prompt=prompt, negative_prompt=negative_prompt or "", seed=int(seed or 0),
                                 steps=int(steps) if steps else None, guidance=float(guidance), lora_scale=float(lora_scale),
                                 checkpoint=checkpoint or FINAL)
        return service.sample(job_id, _user(request), request_)

    @_plain_errors
    def download(job_id, kind, request: gr.Request):
        return service.download(job_id, _user(request), kind or "zip")

    go.click(create_job, [files_in, settings_in], [job_out], api_name="create_job")
    go.click(sample, [job_in, prompt_in, seed_in, scale_in, negative_in, steps_in, guidance_in, checkpoint_in], [images_out],
             api_name="sample")
    go.click(download, [job_in, kind_in], [file_out], api_name="download")

    @_plain_errors
    def job_status(job_id: str, request: gr.Request) -> dict:
        """{state, step, max_steps, loss, eta_seconds, error, queue_position, name, job_id}"""
        return service.job_status(job_id, _user(request))

    @_plain_errors
    def stop_job(job_id: str, request: gr.Request) -> dict:
        """Stop: a running job finishes its step and saves a checkpoint and the LoRA."""
        return service.stop_job(job_id, _user(request))

    @_plain_errors
    def resume_job(job_id: str, request: gr.Request) -> dict:
        """Queue a stopped or failed job again; it continues from its newest checkpoint."""
        return service.resume_job(job_id, _user(request))

    @_plain_errors
    def delete_job(job_id: str, request: gr.Request) -> dict:
        """Delete the job's uploads and outputs (a running job is killed first)."""
        return service.delete_job(job_id, _user(request))

    @_plain_errors
    def list_jobs(request: gr.Request) -> list:
        """The caller's jobs, newest first, each as job_status returns it."""
        return service.list_jobs(_user(request))

    for fn in (job_status, stop_job, resume_job, delete_job, list_jobs):
        cheap = fn in (job_status, list_jobs)  # file reads only: straight HTTP, no queue round trip
        gr.api(fn, api_name=fn.__name__, queue=not cheap, concurrency_limit=None if cheap else "default")
