"""Sampling a job's LoRA next to its base model, and a grid over checkpoints x LoRA scales.

The pipeline is the trainer's own (``validation.build_pipeline``: SD 1.x/2.x, or SDXL with both
text encoders). The final LoRA is loaded the way a user would load the download
(``load_lora_into_pipeline``, i.e. diffusers' ``load_lora_weights``), so sampling it also proves
the file works. A checkpoint has no LoRA file, only the trained tensors: those are put back into
the same adapters the trainer attached (``lora_setup.attach_lora`` with the checkpoint's own
settings) by the checkpoint format's one reader (``engine.checkpoints.load_params``). The base
image is the same pipeline with the adapters switched off (``lora_setup.adapters_disabled``), with
the same seed, so the two differ only by the LoRA. Runs in the app process, one request at a
time, keeping the last model loaded.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from . import jobs
from .errors import AppError

__all__ = ["Sampler", "SampleRequest", "checkpoint_names", "FINAL"]

FINAL = "final"


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int | None = None  # None: the run's validation steps
    guidance: float = 7.5
    lora_scale: float = 1.0
    checkpoint: str = FINAL

    def check(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip() or len(self.prompt) > 1000:
            raise AppError("Write a prompt (one line, at most 1000 characters), e.g. 'a photo of sks dog on the beach'.")
        if not isinstance(self.negative_prompt, str) or len(self.negative_prompt) > 1000:
            raise AppError("The negative prompt must be text of at most 1000 characters.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise AppError(f"The seed must be a whole number >= 0, got {self.seed!r}.")
        if self.steps is not None and not (isinstance(self.steps, int) and 1 <= self.steps <= 150):
            raise AppError(f"Sampling steps must be between 1 and 150, got {self.steps!r}.")
        if not isinstance(self.guidance, (int, float)) or not 0 <= self.guidance <= 30:
            raise AppError(f"Guidance must be between 0 and 30, got {self.guidance!r}.")
        if not isinstance(self.lora_scale, (int, float)) or not -2 <= self.lora_scale <= 4:
            raise AppError(f"The LoRA scale must be between -2 and 4, got {self.lora_scale!r}.")


def checkpoint_names(job_dir: Path) -> list[str]:
    """The job's checkpoints (oldest first) and ``final`` once the LoRA file exists."""
    from adaprelora_diffusion.dreambooth.lora_files import LORA_WEIGHT_NAME
    from adaprelora_diffusion.engine.checkpoints import list_checkpoints

    names = [p.name for p in list_checkpoints(jobs.output_dir(job_dir))]
    if (jobs.output_dir(job_dir) / LORA_WEIGHT_NAME).is_file():
        names.append(FINAL)
    return names


class Sampler:
    def __init__(self):
        self._lock = threading.Lock()
        self._base: tuple[Any, Any] | None = None  # (model key, SDComponents)
        self._pipe: tuple[Any, Any, Any] | None = None  # (key, pipeline, resolved config)

    def _config(self, job_dir: Path):
        from adaprelora_diffusion.dreambooth import TrainConfig
        from adaprelora_diffusion.dreambooth.model_loading import model_defaults, resolve_model_source

        config = TrainConfig(**jobs.read_job(job_dir)["train"])
        return config.resolved(model_defaults(resolve_model_source(config.pretrained_model_name_or_path)[1]))

    def _components(self, model: str | None):
        from adaprelora_diffusion.dreambooth.model_loading import load_pipeline_components

        if self._base is None or self._base[0] != model:
            self._base = None  # free the old model first
            try:
                self._base = (model, load_pipeline_components(model))
            except (OSError, ValueError) as err:
                raise AppError(f"Cannot load the base model: {err}") from err
        return self._base[1]

    def _pipeline(self, job_dir: Path, checkpoint: str):
        key = (str(job_dir), checkpoint)
        if self._pipe is not None and self._pipe[0] == key:
            return self._pipe[1], self._pipe[2]
        if checkpoint not in checkpoint_names(job_dir):
            raise AppError(f"This job has no checkpoint {checkpoint[:40]!r} (it has: {', '.join(checkpoint_names(job_dir)) or 'none yet'}).")
        from adaprelora_diffusion.dreambooth.validation import build_pipeline, make_sampling_scheduler

        config = self._config(job_dir)
        base = self._components(config.pretrained_model_name_or_path)
        self._pipe = None
        # the trainer's own pipeline builder (SD 1.x/2.x or SDXL), around copies that take the LoRA
        unet, text_encoder = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
        text_encoder_2 = copy.deepcopy(base.text_encoder_2) if base.is_sdxl else None
        pipe = build_pipeline(unet=unet, text_encoder=text_encoder, vae=base.vae, tokenizer=base.tokenizer,
                              scheduler=make_sampling_scheduler(base.noise_scheduler.config), text_encoder_2=text_encoder_2,
                              tokenizer_2=base.tokenizer_2)
        pipe.set_progress_bar_config(disable=True)
        if checkpoint == FINAL:
            from adaprelora_diffusion.dreambooth.lora_files import load_lora_into_pipeline

            load_lora_into_pipeline(pipe, jobs.output_dir(job_dir))
        else:
            self._load_checkpoint(jobs.output_dir(job_dir) / checkpoint, unet, text_encoder, text_encoder_2)
        self._pipe = (key, pipe, config)
        return pipe, config

    @staticmethod
    def _load_checkpoint(path: Path, unet, text_encoder, text_encoder_2) -> None:
        """The checkpoint's trained tensors, put back into the adapters the trainer attached (its own settings)."""
        from adaprelora_diffusion.dreambooth import TrainConfig
        from adaprelora_diffusion.dreambooth.lora_setup import attach_lora, trained_params_by_name
        from adaprelora_diffusion.engine.checkpoints import CheckpointError, load_params, read_run_config, verify_checkpoint

        try:
            verify_checkpoint(path)
            saved = TrainConfig(**(read_run_config(path) or {}))
            attach_lora(unet, [te for te in (text_encoder, text_encoder_2) if te is not None], saved)
            load_params(path, trained_params_by_name({"unet": unet, "text_encoder": text_encoder,
                                                      "text_encoder_2": text_encoder_2}))
        except CheckpointError as err:
            raise AppError(f"{err} Pick another checkpoint.") from err

    def _generate(self, pipe, config, request: SampleRequest, lora: bool) -> Image.Image:
        import torch

        from adaprelora_diffusion.dreambooth.lora_setup import adapters_disabled

        steps = request.steps or config.num_validation_inference_steps
        context = contextlib.nullcontext() if lora else adapters_disabled(pipe.unet, pipe.text_encoder,
                                                                          getattr(pipe, "text_encoder_2", None))
        with torch.no_grad(), context:
            return pipe(request.prompt, negative_prompt=request.negative_prompt or None, height=config.resolution,
                        width=config.resolution, num_inference_steps=steps, guidance_scale=float(request.guidance),
                        generator=torch.Generator("cpu").manual_seed(request.seed),
                        cross_attention_kwargs={"scale": float(request.lora_scale)} if lora else None).images[0]

    def compare(self, job_dir: Path, request: SampleRequest) -> tuple[Image.Image, Image.Image]:
        """(base model, base model + LoRA) for the same prompt and seed."""
        request.check()
        with self._lock:
            pipe, config = self._pipeline(job_dir, request.checkpoint)
            return self._generate(pipe, config, request, lora=False), self._generate(pipe, config, request, lora=True)

    def grid(self, job_dir: Path, request: SampleRequest, checkpoints: list[str], scales: list[float]) -> Image.Image:
        """Rows: checkpoints; columns: LoRA scales; one labelled image to pick the best checkpoint from."""
        request.check()
        if not checkpoints or not scales or len(checkpoints) * len(scales) > 48:
            raise AppError("Pick 1-8 checkpoints and 1-6 LoRA scales (48 images at most).")
        rows = []
        with self._lock:
            for name in checkpoints:
                pipe, config = self._pipeline(job_dir, name)
                rows.append([self._generate(pipe, config, SampleRequest(**{**request.__dict__, "lora_scale": s}), lora=True)
                             for s in scales])
        return _compose(rows, checkpoints, [f"scale {s:g}" for s in scales])


def _compose(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    cell = max(128, rows[0][0].width)
    margin_left, margin_top = 110, 20
    grid = Image.new("RGB", (margin_left + cell * len(col_labels), margin_top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(col_labels):
        draw.text((margin_left + c * cell + 4, 4), label, fill="black")
    for r, (label, images) in enumerate(zip(row_labels, rows)):
        draw.text((4, margin_top + r * cell + cell // 2), label, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (margin_left + c * cell, margin_top + r * cell))
    return grid
