"""An SDXL job in the app: it trains (both text encoders' LoRA too), and /sample and the grid return
images from the final LoRA and from a checkpoint, through the trainer's own pipeline builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import demo_images, wait_for

gradio_client = pytest.importorskip("gradio_client")


def test_an_sdxl_job_trains_and_samples(launch, tiny_sdxl_pipeline_dir):
    sdxl = Path(tiny_sdxl_pipeline_dir)
    app = launch("--model-dir", str(sdxl.parent))
    client = app.client()
    settings = {"pretrained_model_name_or_path": str(sdxl), "class_word": "robot toy", "max_train_steps": 4,
                "checkpointing_steps": 2, "validation_steps": 2, "train_text_encoder": True, "rank": 2}
    job = client.predict([gradio_client.handle_file(p) for p in demo_images()], settings, api_name="/create_job")
    status = wait_for(client, job)
    assert status["state"] == "done" and status["step"] == 4, status

    for checkpoint in ("final", "checkpoint-2"):
        base, lora = client.predict(job, "a photo of sks robot toy", 3, 1.0, "", 2, 7.5, checkpoint, api_name="/sample")
        images = [np.asarray(Image.open(item["image"]).convert("RGB")) for item in (base, lora)]
        assert all(image.shape == (64, 64, 3) for image in images), [i.shape for i in images]
        assert "LoRA " + checkpoint in lora["caption"]

    from app.sampling import SampleRequest
    from app.service import JobService
    from app.uploads import UploadLimits
    from app.workspace import Workspace

    service = JobService(Workspace(app.workspace), [sdxl.parent], UploadLimits())
    grid = Image.open(service.sample_grid(job, "", SampleRequest(prompt="a photo of sks robot toy", steps=2),
                                          ["checkpoint-2", "final"], [0.0, 1.0]))
    assert grid.size == (110 + 2 * 128, 20 + 2 * 128)
