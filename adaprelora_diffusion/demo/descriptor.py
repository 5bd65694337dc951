"""What the embedded tiny pipelines tell the trainer about themselves (``adaprelora_model.json``).

The trainer reads the descriptor of any model folder (the format: ``engine/model_descriptor.py``);
the demo's pipelines use it to ask for 64 px, the demo subject and settings that suit them, so
the trainer needs no knowledge of the demo.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..engine.model_descriptor import MODEL_DESCRIPTOR
from ..engine.atomic import atomic_write_text

__all__ = ["DEMO_SUBJECT_DIR", "DEMO_INSTANCE_PROMPT", "SMOKE_DEFAULTS", "DEMO_DEFAULTS", "ensure_descriptor", "write_descriptor"]

DEMO_SUBJECT_DIR = Path(__file__).resolve().parent / "assets" / "demo_subject"
DEMO_INSTANCE_PROMPT = "a photo of sks robot toy"

#: what a run on the tiny random-weight pipeline uses: a smoke run of the machinery in seconds.
SMOKE_DEFAULTS = {
    "learning_rate": 1e-4,
    "lora_target_modules": "attention",
    "resolution": 64,
    "max_train_steps": 60,
    "checkpointing_steps": 30,
    "validation_steps": 30,
    "num_validation_images": 2,
    "num_validation_inference_steps": 4,
    "num_class_images": 4,
}
#: what a run on the tiny pretrained pipeline (the default model) uses: about a minute on a CPU, enough
#: for the LoRA to draw the demo robot's shape and colours (at 1e-4 and attention-only targets 60 steps
#: change nothing visible; 1000 attention-only steps at 1e-3 collapse into colour noise). The lr is
#: AdaPreLoRA version 3's: 400 steps end at loss 0.171 at 3e-3 against 0.189 at 1e-3.
DEMO_DEFAULTS = {
    **SMOKE_DEFAULTS,
    "learning_rate": 3e-3,
    "lora_target_modules": "all",
    "max_train_steps": 400,
    "checkpointing_steps": 200,
    "validation_steps": 200,
    "num_validation_images": 4,
    "num_validation_inference_steps": 20,
}

_ABOUT = {
    "tiny": dict(
        defaults=SMOKE_DEFAULTS,
        notice="Using the tiny random-weight Stable Diffusion pipeline: it is for smoke runs and tests only "
               "(its images are noise); pass a real SD 1.x/2.x model to train for real.",
    ),
    "tiny_sdxl": dict(
        defaults=SMOKE_DEFAULTS,
        notice="Using the tiny random-weight SDXL pipeline: it is for smoke runs and tests only (its images are noise); "
               "pass a real SDXL model to train for real.",
        base_model_version="sdxl_base_v1-0",
    ),
    "tiny_pretrained": dict(
        defaults=DEMO_DEFAULTS,
        notice="Using the tiny Stable Diffusion pipeline pretrained on procedural shapes (64 px, a few MB): "
               "it draws coloured shapes, enough to watch a LoRA learn a subject on a CPU, not real images; pass "
               "--pretrained_model_name_or_path with a real SD 1.x/2.x model to train for real.",
    ),
}


def write_descriptor(folder: str | os.PathLike, kind: str) -> Path:
    """Write ``folder/adaprelora_model.json`` for a tiny pipeline of ``kind`` ("tiny" or "tiny_pretrained").

    The demo subject is named relative to the folder when it is a sibling (the shipped copy, so the
    file stays valid wherever the package is installed), else by absolute path (a cache).
    """
    folder = Path(folder)
    about = _ABOUT[kind]
    try:
        subject = os.path.relpath(DEMO_SUBJECT_DIR, folder.resolve()) if folder.resolve().parent == DEMO_SUBJECT_DIR.parent else str(DEMO_SUBJECT_DIR)
    except ValueError:  # another drive (Windows)
        subject = str(DEMO_SUBJECT_DIR)
    info = {
        "kind": kind,
        "notice": about["notice"],
        "base_model_version": about.get("base_model_version", "sd_v1"),
        "training_defaults": {**about["defaults"], "instance_data_dir": subject, "instance_prompt": DEMO_INSTANCE_PROMPT},
    }
    return atomic_write_text(folder / MODEL_DESCRIPTOR, json.dumps(info, indent=2) + "\n")


def ensure_descriptor(folder: str | os.PathLike, kind: str) -> None:
    """Add the descriptor to a complete pipeline folder built before descriptors existed."""
    if not (Path(folder) / MODEL_DESCRIPTOR).is_file():
        write_descriptor(folder, kind)
