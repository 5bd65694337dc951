"""The page and the named API endpoints, wired onto ``JobService`` with Gradio's own pieces.

Nothing here trains or waits for training: every handler reads or writes job folders and
returns at once, so a closed tab, a reload or an app restart never touches a run. The page
reconnects by itself: the browser remembers the selected job (``gr.BrowserState``) and a
``gr.Timer`` refreshes the live view from the job's files, sending each part only when it changed.

API endpoints (``gradio_client``): create_job, job_status, stop_job, resume_job, delete_job,
list_jobs, sample, download (payloads in docs/app.md). File inputs and outputs go through
hidden components, so Gradio itself checks that an input file was uploaded to it; files go out
as the caller's own served copies (served.py). The page's own handlers are private.
"""

from __future__ import annotations

import functools
import html
import inspect
import json
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from adaprelora_diffusion.dreambooth.config import REAL_DEFAULTS
from adaprelora_diffusion.dreambooth.model_loading import model_defaults, resolve_model_source, source_is_sdxl
from adaprelora_diffusion.optim import ADAPRELORA_SETTINGS, OPTIMIZERS

from .captions import suggest_caption
from .errors import AppError
from .jobs import JobState
from .models import DEFAULT_MODEL, model_choices, resolve_model
from .presets import PRESETS, device_defaults, instance_prompt_for, preset_values
from .sampling import FINAL, SampleRequest
from .service import JobService

__all__ = ["build_ui", "CSS", "live_view_update", "adaprelora_inputs"]

CSS = """
.arl-track {background: var(--neutral-200); border-radius: 6px; height: 18px; overflow: hidden;}
.arl-bar {background: var(--color-accent); height: 18px; transition: width .5s;}
.arl-line {margin-top: 6px; font-size: 15px;}
"""
PRIVATE = {"api_visibility": "private"}
DOWNLOAD_NOTE = ("One zip with the diffusers file, the kohya file, the model card (its README says which tool reads which "
                 "file) and the training config; each file on its own below it. **Which file:** "
                 "`pytorch_lora_weights_kohya.safetensors` for AUTOMATIC1111, ComfyUI and kohya's scripts (every key "
                 "applies, with its alpha); `pytorch_lora_weights.safetensors` for diffusers and peft only: AUTOMATIC1111 "
                 "matches none of its keys and ComfyUI loses every UNet attention projection (their alpha is only in the "
                 "file's metadata, which ComfyUI ignores).")


def _user(request: gr.Request | None) -> str:
    return (getattr(request, "username", None) or "") if request is not None else ""


def _handled(service: JobService, what: str):
    """Every failure reaches the person as one sentence: an AppError as it is (bad input, with the fix);
    anything else as "<what> failed (...)", its traceback in the job's log (service.failure)."""
    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except AppError as err:
                raise gr.Error(str(err), print_exception=False) from err
            except gr.Error:
                raise
            except Exception as err:
                bound = signature.bind_partial(*args, **kwargs).arguments
                message = service.failure(what, err, bound.get("job_id"), _user(bound.get("request")))
                raise gr.Error(message, print_exception=False) from err
        return wrapper
    return wrap


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
    pct = 100 if status["state"] == JobState.DONE else (round(100 * step / total) if total else 0)
    parts = [f"<b>{status['state']}</b>", f"step {step}/{total or '?'}"]
    if status.get("loss") is not None:
        parts.append(f"loss {status['loss']:.4f}")
    if status["state"] == JobState.RUNNING:
        parts.append(f"ETA {_eta(status.get('eta_seconds'))}")
    if status.get("queue_position"):
        parts.append(f"position {status['queue_position']} in the queue")
    error = f"<div class='arl-line' style='color:var(--error-text-color)'>{html.escape(status['error'])}</div>" \
        if status.get("error") else ""
    return (f"<div class='arl-track'><div class='arl-bar' style='width:{pct}%'></div></div>"
            f"<div class='arl-line' id='arl-status'>{' · '.join(parts)}</div>{error}")


def _job_choices(service: JobService, user: str) -> list[tuple[str, str]]:
    return [(f"{j['name']} · {j['state']} · {j['job_id']}", j["job_id"]) for j in service.list_jobs(user)]


def _advanced_defaults(preset: str, model: str, model_dirs, unknown: Any = None) -> tuple:
    """The values a preset gives the advanced fields for this model (shown, so nothing is hidden), and a
    sentence saying what they are and why. A model that cannot be resolved gives ``unknown`` for every
    field (an event handler passes ``gr.skip()``: leave what the fields show) and says why."""
    try:
        resolved = resolve_model(model, model_dirs)
        source = resolve_model_source(resolved)[1]
        sdxl = source_is_sdxl(resolved)
    except (AppError, ValueError) as err:
        return (*(unknown,) * 5, f"**Base model:** {err}")
    recommended = model_defaults(source, sdxl=sdxl)
    values = preset_values(preset, recommended)
    resolution = recommended.get("resolution", REAL_DEFAULTS["resolution"])
    family = "an SDXL model" if sdxl else ("the embedded demo model" if resolved is None else "an SD 1.x/2.x model")
    note = (f"**Base model:** {family}. The {preset} preset trains it at **{resolution} px** for **{values['max_train_steps']} "
            f"steps** at learning rate **{values['learning_rate']:g}** (its recommended values; change them under "
            f"Advanced). Photos are checked against {resolution} px.")
    return (values["learning_rate"], values["max_train_steps"], resolution, values["rank"], 0, note)


def adaprelora_inputs() -> list[gr.components.Component]:
    """One field per AdaPreLoRA setting, generated from their one definition (``optim.settings``)."""
    fields = []
    for s in ADAPRELORA_SETTINGS:
        label, info = s.flag, s.help
        if s.kind is bool:
            fields.append(gr.Checkbox(s.default, label=label, info=info))
        elif s.choices is not None:
            fields.append(gr.Dropdown(list(s.choices), value=s.default, label=label, info=info))
        else:
            fields.append(gr.Number(s.default, label=label, info=info))
    return fields


def _adaprelora_values(values: list[Any]) -> dict[str, Any]:
    """The advanced panel's AdaPreLoRA fields that differ from their defaults, as settings."""
    out = {}
    for s, value in zip(ADAPRELORA_SETTINGS, values):
        value = None if value == "" else value
        if s.normalize(value) != s.default:
            out[s.flag] = value
    return out


def live_view_update(service: JobService, job_id: str | None, shown: dict | None, user: str) -> tuple[tuple, dict | None]:
    """What the live view sends for ``job_id``, given what it ``shown`` before: every part that did not
    change is ``gr.skip()``, so an image is sent (and copied for serving) once, not on every tick.
    Returns (the outputs, what is shown now)."""
    skip = gr.skip()
    if not job_id:
        return (progress_html(None), skip, skip, "", "", skip, skip, skip, skip, ""), None
    try:
        view = service.job_view(job_id, user)
    except AppError as err:
        return (progress_html(None), skip, skip, "", str(err), skip, skip, skip, skip, ""), None
    now = {"job": job_id, "state": view["status"]["state"], "loss": len(view["loss"]), "samples": view["samples_key"],
           "checkpoints": view["checkpoints"]}
    before = shown if shown and shown.get("job") == job_id else {}

    def changed(*keys: str) -> bool:
        return any(before.get(k) != now[k] for k in keys) or not before

    ckpts = view["checkpoints"]
    notes_md = "\n".join(f"- **Check:** {w}" for w in view["warnings"])
    outputs = (
        progress_html(view["status"]),
        pd.DataFrame(view["loss"], columns=["step", "loss"]) if changed("loss") else skip,
        service.latest_samples(job_id, user) if changed("samples") else skip,
        view["log"], notes_md,
        gr.update(choices=ckpts or [FINAL], value=FINAL if FINAL in ckpts else (ckpts[-1] if ckpts else FINAL))
        if changed("checkpoints") else skip,
        gr.update(choices=ckpts) if changed("checkpoints") else skip,
        gr.update(value=view["prompt"]) if not before else skip,
        gr.update(choices=_job_choices(service, user)) if changed("state") else skip,
        view["command"] if not before else skip,
    )
    return outputs, now


def build_ui(service: JobService) -> gr.Blocks:
    model_dirs = service.model_dirs
    with gr.Blocks(title="adaprelora · LoRA trainer", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        remembered = gr.BrowserState("", storage_key="adaprelora-selected-job")
        gr.Markdown("# adaprelora · teach Stable Diffusion a subject\nDrop in 3-30 photos, name the subject, press "
                    "**Train**. Training runs on the server: close the tab and come back later.")
        with gr.Row():
            job = gr.Dropdown(label="Job", choices=[], value=None, interactive=True, scale=5, elem_id="job-select")
            refresh = gr.Button("↻ Refresh (jobs and models)", scale=0, min_width=120, elem_id="refresh")

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
                                        label="Base model", info="a local model, or a Hub id owner/name (online only)",
                                        elem_id="model-select")
                # The advanced fields start at the default model's values, set here rather than by a page-load
                # event: a late load event would overwrite what a person typed before it arrived.
                initial = dict(zip(("lr", "steps", "resolution", "rank", "ckpt", "note"),
                                   _advanced_defaults(preset.value, model.value, model_dirs)))
                model_note = gr.Markdown(initial["note"], elem_id="model-note")
                with gr.Accordion("Advanced (the trainer's flags)", open=False):
                    with gr.Row():
                        optimizer = gr.Dropdown(list(OPTIMIZERS), value="adaprelora", label="Optimizer")
                        lr = gr.Number(initial["lr"], label="Learning rate")
                        steps = gr.Number(initial["steps"], label="Steps", precision=0)
                        resolution = gr.Number(initial["resolution"], label="Resolution", precision=0)
                    with gr.Row():
                        rank = gr.Number(initial["rank"], label="LoRA rank", precision=0)
                        ckpt_every = gr.Number(initial["ckpt"], label="Checkpoint every N steps (0: 4 per run)", precision=0)
                        seed = gr.Number(0, label="Seed", precision=0)
                        step0 = gr.Checkbox(not device_defaults().get("skip_initial_validation", False),
                                            label="Samples before training (step 0)",
                                            info="the base model's images; off by default without a GPU (slow there)")
                    with gr.Accordion("AdaPreLoRA's settings", open=False, visible=True) as adaprelora_box:
                        adaprelora = adaprelora_inputs()
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
                    samples = gr.Gallery(label="Validation samples (newest step first)", columns=4, height=260,
                                         object_fit="contain", elem_id="samples")
                log = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, elem_id="log")
                notes = gr.Markdown()
                command = gr.Code(label="The same job from the command line (e.g. on a GPU box; ./photos: your photos, "
                                        "captions as <name>.txt beside them)", language="shell", interactive=False,
                                  buttons=["copy"], elem_id="command")

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
                gr.Markdown(DOWNLOAD_NOTE, elem_id="download-note")
                dl_btn = gr.Button("Prepare downloads", variant="primary")
                dl_files = gr.File(label="Files", file_count="multiple", elem_id="downloads")

        view_key = gr.State(None)  # what the live view last showed, so unchanged parts are not sent again

        # -- handlers ------------------------------------------------------------------------
        def on_load(saved: str, request: gr.Request):
            """Reconnect: the job this browser last looked at (or the newest), on the training tab."""
            choices = _job_choices(service, _user(request))
            ids = [v for _, v in choices]
            chosen = saved if saved in ids else (ids[0] if ids else None)
            return gr.update(choices=choices, value=chosen), gr.Tabs(selected="training" if chosen else "new")

        @_handled(service, "Refreshing the lists")
        def refresh_lists(current: str | None, model_value: str | None, request: gr.Request):
            """The jobs, and the models in the model folders (added ones appear without a restart)."""
            choices = _job_choices(service, _user(request))
            return (gr.update(choices=choices, value=current if current in [v for _, v in choices] else None),
                    gr.update(choices=model_choices(model_dirs), value=model_value))

        @_handled(service, "Checking the photos")
        def check_photos(files, preset_name, model_value, resolution_value, request: gr.Request):
            settings: dict[str, Any] = {"preset": preset_name, "pretrained_model_name_or_path": model_value}
            if resolution_value:
                settings["resolution"] = resolution_value
            report_ = service.check_upload(_files(files), settings)
            return (report_.as_markdown(leave_out_refused=True), service.thumbnails(_user(request), report_),
                    [[i.name, ""] for i in report_.usable])

        def suggest_captions(files, preset_name, trigger_word, class_name):
            default = instance_prompt_for(preset_name, trigger_word or "sks", class_name or "object")
            return [[n, suggest_caption(str(p), default)] for n, p in _files(files)]

        def fill_advanced(preset_name, model_value):
            return _advanced_defaults(preset_name, model_value, model_dirs, unknown=gr.skip())

        @_handled(service, "Creating the job")
        def create_from_page(values: dict, request: gr.Request):
            settings: dict[str, Any] = {"preset": values[preset], "pretrained_model_name_or_path": values[model],
                                        "trigger_word": values[trigger], "class_word": values[class_word],
                                        "optimizer": values[optimizer]}
            if values[name]:
                settings["name"] = values[name]
            # a field left at one of its "unset" values leaves the setting to the preset and the model
            for key, field, unset in (("learning_rate", lr, (None, "")), ("max_train_steps", steps, (None, "")),
                                      ("resolution", resolution, (None, "")), ("rank", rank, (None, "")),
                                      ("checkpointing_steps", ckpt_every, (None, "", 0)), ("seed", seed, (None, ""))):
                if values[field] not in unset:
                    settings[key] = values[field]
            settings["skip_initial_validation"] = not values[step0]
            if values[optimizer] == "adaprelora":
                settings.update(_adaprelora_values([values[c] for c in adaprelora]))
            extra_json = values[extra]
            if extra_json and extra_json.strip():
                try:
                    more = json.loads(extra_json)
                except ValueError as err:
                    raise AppError(f"'Other flags' is not valid JSON ({err}): write e.g. {{\"lora_alpha\": 8}}.") from err
                if not isinstance(more, dict):
                    raise AppError("'Other flags' must be a JSON object, e.g. {\"lora_alpha\": 8}.")
                settings = {**more, **settings}
            caption_rows = values[captions]
            rows = caption_rows.values.tolist() if isinstance(caption_rows, pd.DataFrame) else (caption_rows or [])
            settings["captions"] = {str(r[0]): str(r[1]) for r in rows if r and r[0] and r[1] and str(r[1]).strip()}
            job_id = service.create_job(_files(values[photos]), settings, _user(request), leave_out_refused=True)
            choices = _job_choices(service, _user(request))
            return gr.update(choices=choices, value=job_id), job_id, gr.Tabs(selected="training"), None

        @_handled(service, "Showing the job")
        def live_view(job_id: str | None, shown, request: gr.Request):
            outputs, now = live_view_update(service, job_id, shown, _user(request))
            return (*outputs[:8], now, *outputs[8:])

        @_handled(service, "Stopping the job")
        def stop(job_id, request: gr.Request):
            service.stop_job(job_id, _user(request))

        @_handled(service, "Resuming the job")
        def resume(job_id, request: gr.Request):
            service.resume_job(job_id, _user(request))

        @_handled(service, "Deleting the job")
        def delete(job_id, request: gr.Request):
            service.delete_job(job_id, _user(request))
            return gr.update(choices=_job_choices(service, _user(request)), value=None), "", None

        @_handled(service, "Sampling")
        def sample_pair(job_id, prompt_, negative_, seed_, steps_, guidance_, scale_, checkpoint_, request: gr.Request):
            request_ = SampleRequest(prompt=prompt_, negative_prompt=negative_ or "", seed=int(seed_ or 0),
                                     steps=int(steps_) or None if steps_ else None, guidance=float(guidance_),
                                     lora_scale=float(scale_), checkpoint=checkpoint_ or FINAL)
            return service.sample(job_id, _user(request), request_)

        @_handled(service, "Making the grid")
        def sample_grid(job_id, prompt_, negative_, seed_, steps_, guidance_, ckpts, scales_text, request: gr.Request):
            try:
                scales = [float(s) for s in scales_text.replace(";", ",").split(",") if s.strip()]
            except ValueError as err:
                raise AppError(f"LoRA scales must be numbers separated by commas, e.g. 0, 0.5, 1 ({err}).") from err
            request_ = SampleRequest(prompt=prompt_, negative_prompt=negative_ or "", seed=int(seed_ or 0),
                                     steps=int(steps_) or None if steps_ else None, guidance=float(guidance_))
            return service.sample_grid(job_id, _user(request), request_, list(ckpts or []), scales)

        @_handled(service, "Preparing the downloads")
        def downloads(job_id, request: gr.Request):
            return service.download_all(job_id, _user(request))

        demo.load(on_load, [remembered], [job, tabs], **PRIVATE)
        job.change(lambda j: j or "", [job], [remembered], **PRIVATE)
        refresh.click(refresh_lists, [job, model], [job, model], **PRIVATE)
        # .change also fires on upload; Gradio's File leaves an empty temporary file per photo per call (served.py sweeps them)
        for trigger_ in (photos.change, resolution.change):
            trigger_(check_photos, [photos, preset, model, resolution], [report, thumbs, captions], **PRIVATE)
        suggest.click(suggest_captions, [photos, preset, trigger, class_word], [captions], **PRIVATE)
        advanced = [lr, steps, resolution, rank, ckpt_every, model_note]
        for trigger_ in (preset.change, model.change):
            trigger_(fill_advanced, [preset, model], advanced, **PRIVATE)
        optimizer.change(lambda o: gr.Accordion(visible=o == "adaprelora"), [optimizer], [adaprelora_box], **PRIVATE)
        preset.change(lambda p: "person" if p == "person" else gr.skip(), [preset], [class_word], **PRIVATE)
        page_inputs = {photos, captions, preset, model, trigger, class_word, name, optimizer, lr, steps, resolution, rank,
                       ckpt_every, seed, step0, extra, *adaprelora}
        train_btn.click(create_from_page, page_inputs, [job, remembered, tabs, view_key], **PRIVATE)
        live_outputs = [progress, loss_plot, samples, log, notes, checkpoint, grid_ckpts, prompt, view_key, job, command]
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
    """The scriptable API. Files travel through hidden components so Gradio checks uploads."""
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

    @_handled(service, "Creating the job")
    def create_job(images, settings, request: gr.Request):
        return service.create_job(_files(images), settings, _user(request))

    @_handled(service, "Sampling")
    def sample(job_id, prompt, seed, lora_scale, negative_prompt, steps, guidance, checkpoint, request: gr.Request):
        request_ = SampleRequest(prompt=prompt, negative_prompt=negative_prompt or "", seed=int(seed or 0),
                                 steps=int(steps) if steps else None, guidance=float(guidance), lora_scale=float(lora_scale),
                                 checkpoint=checkpoint or FINAL)
        return service.sample(job_id, _user(request), request_)

    @_handled(service, "Preparing the download")
    def download(job_id, kind, request: gr.Request):
        return service.download(job_id, _user(request), kind or "zip")

    go.click(create_job, [files_in, settings_in], [job_out], api_name="create_job")
    go.click(sample, [job_in, prompt_in, seed_in, scale_in, negative_in, steps_in, guidance_in, checkpoint_in], [images_out],
             api_name="sample")
    go.click(download, [job_in, kind_in], [file_out], api_name="download")

    @_handled(service, "Reading the job's status")
    def job_status(job_id: str, request: gr.Request) -> dict:
        """{state, step, max_steps, loss, eta_seconds, error, queue_position, name, job_id}"""
        return service.job_status(job_id, _user(request))

    @_handled(service, "Stopping the job")
    def stop_job(job_id: str, request: gr.Request) -> dict:
        """Stop: a running job finishes its step and saves a checkpoint and the LoRA."""
        return service.stop_job(job_id, _user(request))

    @_handled(service, "Resuming the job")
    def resume_job(job_id: str, request: gr.Request) -> dict:
        """Queue a stopped or failed job again; it continues from its newest checkpoint."""
        return service.resume_job(job_id, _user(request))

    @_handled(service, "Deleting the job")
    def delete_job(job_id: str, request: gr.Request) -> dict:
        """Delete the job's uploads and outputs (a running job is killed first)."""
        return service.delete_job(job_id, _user(request))

    @_handled(service, "Listing the jobs")
    def list_jobs(request: gr.Request) -> list:
        """The caller's jobs, newest first, each as job_status returns it."""
        return service.list_jobs(_user(request))

    for fn in (job_status, stop_job, resume_job, delete_job, list_jobs):
        cheap = fn in (job_status, list_jobs)  # file reads only: straight HTTP, no queue round trip
        gr.api(fn, api_name=fn.__name__, queue=not cheap, concurrency_limit=None if cheap else "default")
