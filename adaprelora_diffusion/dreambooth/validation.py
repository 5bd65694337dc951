"""Sample images from the model being trained, without disturbing the training run.

Validation happens in the middle of training, so it must leave no trace: the trained modules
keep their dtypes, ``requires_grad`` flags, train/eval modes and weights, and torch's global RNG
is not advanced (a run resumed from a checkpoint must draw the same dropout masks and noise as
the uninterrupted run, whether or not validation ran in between). Noise comes only from CPU
``torch.Generator`` objects seeded per image, so a prompt and seed give the same images on any
device and at any point in training.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import check_resolution
from ..engine.atomic import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

VALIDATION_SUBDIR = "validation"
PROMPT_FILE = "prompt.txt"
_IMAGE_NAME = re.compile(r"^(\d+)\.png$")


# --------------------------------------------------------------------------------------------
# Leaving the trained modules as they were
# --------------------------------------------------------------------------------------------


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / torch.compile wrappers (as ``accelerator.prepare`` adds) so diffusers sees the model.

    ``keep_fp32_wrapper=True``: the alternative rewrites ``module.forward`` in place, which would
    change the model training continues with. The compiled wrapper is dropped so that sampling
    (eval mode, no grad) does not add recompilations to the training graph's cache.
    """
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module, keep_fp32_wrapper=True, keep_torch_compile=False)


@contextlib.contextmanager
def _eval_mode(modules: Iterable[torch.nn.Module]):
    """Put ``modules`` in eval mode (no dropout) and restore every submodule's own mode afterwards.

    Modes are recorded per submodule because a model can legitimately mix them (e.g. a frozen
    part kept in eval while the LoRA layers train); ``module.train(True)`` would not restore that.
    """
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


def _module_device(modules: Sequence[torch.nn.Module]) -> torch.device:
    devices = {p.device for module in modules for p in module.parameters()}
    if len(devices) != 1:
        raise ValueError(
            f"The unet, text encoder and VAE are spread over several devices ({sorted(map(str, devices))}): "
            f"move them to one device before generating validation images."
        )
    return devices.pop()


def _check_device(device: str | torch.device | None, model_device: torch.device) -> torch.device:
    """The device to sample on: the modules' own; the modules are never moved (that would disturb training)."""
    if device is None:
        return model_device
    device = torch.device(device)
    same = device.type == model_device.type and (device.index is None or device.index == model_device.index)
    if not same:
        raise ValueError(
            f"device={device} but the trained modules are on {model_device}: generate_images does not move "
            f"the modules being trained; pass device=None (or {model_device}), or move them first."
        )
    return model_device


def _rng_guard(device: torch.device):
    """Restore the global CPU (and this CUDA device's) RNG state afterwards, as a second line of defence.

    The first line is that every random draw takes an explicit generator; this guard also covers
    library code paths that might draw from the global RNG without one.
    """
    cuda_devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda_devices, device_type="cuda")


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def make_sampling_scheduler(scheduler_config):
    """A DPM-Solver++ (2nd order multistep) scheduler with the model's own noise schedule.

    DPM-Solver++ gives usable SD images in 20-25 steps (DDPM needs hundreds) and, in its default
    ``dpmsolver++`` variant, adds no noise between steps, so the seed alone fixes the image. It is
    also what diffusers' DreamBooth LoRA examples validate with. Built from the training
    scheduler's config so the beta schedule and ``prediction_type`` (epsilon / v) match the model.
    """
    from diffusers import DPMSolverMultistepScheduler

    config = getattr(scheduler_config, "config", scheduler_config)  # a scheduler object also works
    if not isinstance(config, Mapping):
        raise ValueError(
            f"scheduler_config must be a scheduler config (e.g. noise_scheduler.config); got {type(scheduler_config).__name__}."
        )
    return DPMSolverMultistepScheduler.from_config(config)


def _check_generation_args(prompt, num_images, seed, resolution, num_inference_steps) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string (e.g. 'a photo of sks dog'); got {prompt!r}.")
    for name, value, low in (("num_images", num_images, 1), ("num_inference_steps", num_inference_steps, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    check_resolution(resolution)


def build_pipeline(*, unet, text_encoder, vae, tokenizer, scheduler, text_encoder_2=None, tokenizer_2=None):
    """A diffusers pipeline around in-memory modules: ``StableDiffusionXLPipeline`` when there is a
    second text encoder, else ``StableDiffusionPipeline`` without a safety checker."""
    from .model_loading import stable_diffusion_pipeline_class

    if text_encoder_2 is not None:
        return stable_diffusion_pipeline_class(sdxl=True)(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
            unet=unet, scheduler=scheduler)
    return stable_diffusion_pipeline_class()(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def generate_images(
    *,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    vae: torch.nn.Module,
    tokenizer,
    scheduler_config,
    prompt: str,
    num_images: int,
    seed: int,
    resolution: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    batch_size: int = 1,
    text_encoder_2: torch.nn.Module | None = None,
    tokenizer_2=None,
) -> list[Image.Image]:
    """Generate ``num_images`` images of ``prompt`` with the in-memory (LoRA-carrying) modules.

    Image ``i`` starts from a CPU generator seeded with ``seed + i``, so it does not depend on
    ``num_images``, the device or the state of training; ``batch_size`` images share each UNet
    call (diffusers draws each one's latents from its own generator), which only changes float
    rounding and is many times faster for small models. ``autocast_dtype`` (e.g.
    ``torch.float16``) runs sampling under ``torch.autocast``, needed when the modules hold mixed
    dtypes (fp16 frozen weights with fp32 LoRA). Sampling runs on the modules' device.
    """
    _check_generation_args(prompt, num_images, seed, resolution, num_inference_steps)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    unet, text_encoder, vae = (_unwrap(m) for m in (unet, text_encoder, vae))
    text_encoder_2 = _unwrap(text_encoder_2) if text_encoder_2 is not None else None
    modules = tuple(m for m in (unet, text_encoder, vae, text_encoder_2) if m is not None)
    device = _check_device(device, _module_device(modules))

    pipe = build_pipeline(unet=unet, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer,
                          scheduler=make_sampling_scheduler(scheduler_config), text_encoder_2=text_encoder_2,
                          tokenizer_2=tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )

    images: list[Image.Image] = []
    with _rng_guard(device), _eval_mode(modules), torch.no_grad(), autocast:
        for start in range(0, num_images, batch_size):
            count = min(batch_size, num_images - start)
            out = pipe(
                [prompt] * count,
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(count)],
                output_type="pil",
            )
            images.extend(out.images)
    return images


# --------------------------------------------------------------------------------------------
# Saving and logging
# --------------------------------------------------------------------------------------------


def validation_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """``output_dir/validation/step-000123``: zero-padded so folders sort by step."""
    return Path(output_dir) / VALIDATION_SUBDIR / f"step-{step:06d}"


def _check_images(images) -> list[Image.Image]:
    images = list(images)
    if not images:
        raise ValueError("No images given: pass the list returned by generate_images.")
    bad = [f"#{i}: {type(im).__name__}" for i, im in enumerate(images) if not isinstance(im, Image.Image)]
    if bad:
        raise ValueError(f"Expected PIL images; got {', '.join(bad)}.")
    return images


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0 (the global training step); got {step!r}.")
    return step


def save_validation_images(
    images: Sequence[Image.Image], output_dir: str | os.PathLike, step: int, prompt: str
) -> list[Path]:
    """Write ``output_dir/validation/step-{step:06d}/{i:02d}.png`` and ``prompt.txt``; return the PNG paths.

    Each file is written atomically. Numbered PNGs left there by an earlier run with more images
    (e.g. before a resume) are removed, so the folder shows exactly this call's images.
    """
    images = _check_images(images)
    _check_step(step)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {output_dir} is a file: pass the training output folder.")
    folder = validation_dir(output_dir, step)
    paths = []
    for i, image in enumerate(images):
        paths.append(atomic_write(folder / f"{i:02d}.png", lambda tmp, im=image: im.save(tmp, format="PNG")))
    atomic_write_text(folder / PROMPT_FILE, prompt + "\n")
    keep = {p.name for p in paths}
    for stale in folder.iterdir():
        if _IMAGE_NAME.match(stale.name) and stale.name not in keep:
            stale.unlink()
    return paths


def _to_nhwc(images: Sequence[Image.Image]) -> np.ndarray:
    arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"Images to log must share one size; got {sorted(shapes)}.")
    return np.stack(arrays)


def log_images(trackers, images: Sequence[Image.Image], step: int, tag: str = "validation") -> None:
    """Log ``images`` to the accelerate trackers (``accelerator.trackers``) that can show images.

    TensorBoard gets one uint8 NHWC batch (shown as a grid). Other trackers are skipped with a
    debug message rather than an error: a missing image panel must not stop a training run.
    """
    images = _check_images(images)
    _check_step(step)
    batch = None
    for tracker in trackers:
        name = getattr(tracker, "name", type(tracker).__name__)
        if name == "tensorboard":
            batch = _to_nhwc(images) if batch is None else batch
            tracker.writer.add_images(tag, batch, step, dataformats="NHWC")
        else:
            logger.debug("Not logging validation images to tracker %r: only tensorboard is supported.", name)
