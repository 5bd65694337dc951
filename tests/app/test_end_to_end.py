"""A whole cycle through the API as a script would drive it: upload, train, poll, sample, download,
and the downloaded LoRA (both files) changes a diffusers pipeline's output."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import demo_images, tiny_settings, wait_for

gradio_client = pytest.importorskip("gradio_client")


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_upload_train_sample_download_and_the_lora_works_in_diffusers(shared_app, tiny_model_dir, tmp_path):
    app = shared_app
    client = app.client()
    captions = {"bolt_02_wave.png": "a photo of sks robot toy waving"}
    job_id = client.predict([gradio_client.handle_file(p) for p in demo_images()],
                            tiny_settings(tiny_model_dir, captions=captions), api_name="/create_job")

    status = wait_for(client, job_id)
    assert status["state"] == "done", status
    assert status["step"] == status["max_steps"] == 8 and status["error"] is None and status["loss"] is not None
    assert job_id in [j["job_id"] for j in client.predict(api_name="/list_jobs")]
    uploads = app.workspace / "jobs" / job_id / "uploads"
    assert (uploads / "002_bolt_02_wave.txt").read_text() == captions["bolt_02_wave.png"]  # the caption reached the trainer

    base, lora = client.predict(job_id, "a photo of sks robot toy", 7, 1.0, api_name="/sample")
    assert "base" in base["caption"] and "LoRA" in lora["caption"]
    assert np.abs(_pixels(base["image"]) - _pixels(lora["image"])).max() > 0, "the LoRA did not change the sample"
    again = client.predict(job_id, "a photo of sks robot toy", 7, 0.0, api_name="/sample")
    assert np.array_equal(_pixels(again[0]["image"]), _pixels(again[1]["image"])), "LoRA scale 0 should be the base model"

    _assert_the_grid_shows_every_checkpoint_at_every_scale(app, job_id)

    archive = Path(client.predict(job_id, "zip", api_name="/download"))
    names = set(zipfile.ZipFile(archive).namelist())
    assert names == {"pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors", "README.md",
                     "training_config.json"}
    single = Path(client.predict(job_id, "kohya", api_name="/download"))
    assert single.name == "pytorch_lora_weights_kohya.safetensors"

    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(archive).extractall(unpacked)
    which = (unpacked / "README.md").read_text().split("## Which file for which tool")[1]  # the zip says which tool reads which
    assert "`pytorch_lora_weights_kohya.safetensors` | AUTOMATIC1111, ComfyUI" in which
    _assert_lora_changes_a_diffusers_pipeline(tiny_model_dir / "tiny-sd", unpacked)


def _assert_the_grid_shows_every_checkpoint_at_every_scale(app, job_id: str) -> None:
    """The page's grid (checkpoints x LoRA scales), through the same service the page calls."""
    from app.sampling import SampleRequest
    from app.service import JobService
    from app.uploads import UploadLimits
    from app.workspace import Workspace

    service = JobService(Workspace(app.workspace), [app.model_dir], UploadLimits())
    names = service.checkpoints(job_id, "")
    assert names == ["checkpoint-4", "checkpoint-8", "final"]
    grid = Image.open(service.sample_grid(job_id, "", SampleRequest(prompt="a photo of sks robot toy"), names, [0.0, 1.0]))
    assert grid.size == (110 + 2 * 128, 20 + 3 * 128)
    cells = np.asarray(grid.convert("RGB"), dtype=np.int16)
    at_scale_0 = [cells[20 + r * 128:20 + (r + 1) * 128, 110:238] for r in range(3)]
    at_scale_1 = [cells[20 + r * 128:20 + (r + 1) * 128, 238:366] for r in range(3)]
    assert all(np.array_equal(at_scale_0[0], c) for c in at_scale_0), "scale 0 must be the base model for every checkpoint"
    assert not np.array_equal(at_scale_1[0], at_scale_1[1]), "checkpoints 4 and 8 should differ"
    with pytest.raises(Exception, match="no checkpoint 'checkpoint-99'"):
        service.sample_grid(job_id, "", SampleRequest(prompt="x"), ["checkpoint-99"], [1.0])


def _assert_lora_changes_a_diffusers_pipeline(model: Path, lora_folder: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    def render(weight_name: str | None) -> np.ndarray:
        pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        if weight_name:
            pipe.load_lora_weights(str(lora_folder), weight_name=weight_name)
        out = pipe("a photo of sks robot toy", num_inference_steps=3, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        return out.images[0]

    base = render(None)
    for weight_name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        assert np.abs(render(weight_name) - base).max() > 1e-4, f"{weight_name} did not change the output"
