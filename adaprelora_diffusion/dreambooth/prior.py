"""Class images for DreamBooth prior preservation, generated once by the base model and reused.

Generating hundreds of class images is the slowest part of a short DreamBooth run, so it is
resumable: images already in the folder are counted and only the missing ones are made, the base
pipeline is loaded only when something is missing, and every image is written atomically, so an
interrupted run leaves complete PNGs that the next run keeps. Image ``class-{index:05d}.png`` is
always sampled with seed ``seed + index``, so a resumed run makes the same images an
uninterrupted one would have (bit for bit when batched alike; a different batch grouping can move
a pixel by one level, as CPU/GPU kernels round differently per batch shape).

Call this on the main process only (then ``accelerator.wait_for_everyone()``): two processes
topping up the same folder would pick the same new names.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import UnidentifiedImageError

from .data import CAPTION_EXTENSION, _probe, check_resolution
from ..engine.atomic import atomic_write
from ..engine.quiet_imports import no_image_processor_fallback_notice

logger = logging.getLogger(__name__)

CLASS_IMAGE_PREFIX = "class-"
_CLASS_INDEX = re.compile(rf"^{CLASS_IMAGE_PREFIX}(\d+)\.")


def class_image_name(index: int) -> str:
    return f"{CLASS_IMAGE_PREFIX}{index:05d}.png"


def _is_candidate(path: Path) -> bool:
    """Files the dataset's folder scan would consider (hidden and caption files are not)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() != CAPTION_EXTENSION


def existing_class_images(folder: Path) -> list[Path]:
    """The readable images in ``folder``, sorted by name, as ``data.scan_image_folder`` finds them."""
    found = []
    for path in sorted(p for p in folder.iterdir() if _is_candidate(p)):
        try:
            _probe(path)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            logger.debug("Ignoring %s in the class image folder: not a readable image.", path)
            continue
        found.append(path)
    return found


def next_class_index(folder: Path) -> int:
    """One past the highest ``class-NNNNN`` index in ``folder`` (readable or not), so nothing is overwritten."""
    indices = [int(m.group(1)) for p in folder.iterdir() if (m := _CLASS_INDEX.match(p.name))]
    return max(indices, default=-1) + 1


def _check_args(class_data_dir, class_prompt, num_class_images, seed, batch_size, num_inference_steps, resolution) -> Path:
    if not isinstance(class_prompt, str) or not class_prompt.strip():
        raise ValueError(
            f"class_prompt must be a non-empty string describing the subject's class (e.g. 'a photo of a dog'); got {class_prompt!r}."
        )
    for name, value, low in (
        ("num_class_images", num_class_images, 1),
        ("batch_size", batch_size, 1),
        ("num_inference_steps", num_inference_steps, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    check_resolution(resolution)
    if class_data_dir is None or str(class_data_dir) == "":
        raise ValueError("No class image folder given: pass the folder to keep the class images in (it is created if missing).")
    folder = Path(class_data_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"The class image path {folder} is a file, not a folder: pass a folder to keep the class images in.")
    return folder


def _generate_batch(pipe, prompt: str, indices: list[int], seed: int, resolution: int, num_inference_steps: int):
    """Sample one image per index, each from its own CPU generator seeded ``seed + index``."""
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in indices]
    out = pipe(
        [prompt] * len(indices),
        height=resolution,
        width=resolution,
        num_inference_steps=num_inference_steps,
        generator=generators,
        output_type="pil",
    )
    flagged = getattr(out, "nsfw_content_detected", None) or []
    for index, hit in zip(indices, flagged):
        if hit:
            logger.warning(
                "The safety checker blanked class image %s: build the class-image pipeline with "
                "safety_checker=None, or delete that file and rerun.", class_image_name(index)
            )
    return out.images


def ensure_class_images(
    class_data_dir: str | os.PathLike,
    class_prompt: str,
    num_class_images: int,
    *,
    pipeline_factory: Callable[[], object],
    seed: int = 0,
    resolution: int = 512,
    batch_size: int = 4,
    num_inference_steps: int = 25,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Make sure ``class_data_dir`` holds ``num_class_images`` images; return the paths to train with.

    ``pipeline_factory()`` must return the *base* ``StableDiffusionPipeline`` (no LoRA, ideally
    ``safety_checker=None``, already on its device); it is called only if images are missing.
    Existing readable images of any name count; the first ``num_class_images`` by file name are
    returned, the same ones ``DreamBoothDataset(max_class_images=...)`` picks. ``progress(done,
    total)`` is called after each new image is saved.
    """
    folder = _check_args(class_data_dir, class_prompt, num_class_images, seed, batch_size, num_inference_steps, resolution)
    folder.mkdir(parents=True, exist_ok=True)
    existing = existing_class_images(folder)
    missing = num_class_images - len(existing)
    if missing <= 0:
        logger.info("Using %d existing class images from %s.", num_class_images, folder)
        return existing[:num_class_images]

    logger.info("Generating %d class images of %r in %s (%d already there).", missing, class_prompt, folder, len(existing))
    with no_image_processor_fallback_notice():  # the factory usually imports StableDiffusionPipeline
        pipe = pipeline_factory()
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    start = next_class_index(folder)
    indices = list(range(start, start + missing))
    created: list[Path] = []
    for first in range(0, missing, batch_size):
        batch = indices[first : first + batch_size]
        images = _generate_batch(pipe, class_prompt.strip(), batch, seed, resolution, num_inference_steps)
        for index, image in zip(batch, images, strict=True):
            path = folder / class_image_name(index)
            created.append(atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG")))
            if progress is not None:
                progress(len(created), missing)
    return sorted(existing + created)[:num_class_images]
