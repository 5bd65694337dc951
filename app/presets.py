"""Presets: what an object, a person or a style usually needs, relative to the model's own defaults.

Steps and learning rate are factors of the model's recommended values (500 steps at 1e-4 for a
real SD 1.x/2.x model; the embedded demo model recommends its own), so one preset fits both.
Prior preservation keeps a person's class ("a photo of a person") from collapsing onto the
subject; training the text encoder helps faces; styles need more steps. On a machine without a
GPU every preset skips the step-0 samples (``device_defaults``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adaprelora_diffusion.dreambooth.config import REAL_DEFAULTS

from .errors import AppError

__all__ = ["PRESETS", "preset_values", "instance_prompt_for", "device_defaults"]

PRESETS: dict[str, dict[str, Any]] = {
    "object": {"rank": 16, "steps_factor": 1.0, "lr_factor": 1.0, "with_prior_preservation": False, "train_text_encoder": False},
    "person": {"rank": 32, "steps_factor": 1.6, "lr_factor": 0.5, "with_prior_preservation": True, "train_text_encoder": True},
    "style": {"rank": 32, "steps_factor": 2.0, "lr_factor": 1.0, "with_prior_preservation": False, "train_text_encoder": False},
}


def preset_values(name: str, model_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The TrainConfig values a preset sets for a model whose recommended defaults are ``model_defaults``."""
    if name not in PRESETS:
        raise AppError(f"Unknown preset {name!r}: choose one of {', '.join(PRESETS)}.")
    preset = PRESETS[name]
    steps = model_defaults.get("max_train_steps") or REAL_DEFAULTS["max_train_steps"]
    lr = model_defaults.get("learning_rate") or REAL_DEFAULTS["learning_rate"]
    return {"rank": preset["rank"], "max_train_steps": max(1, round(steps * preset["steps_factor"])),
            "learning_rate": float(f"{lr * preset['lr_factor']:.3g}"),
            "with_prior_preservation": preset["with_prior_preservation"],
            "train_text_encoder": preset["train_text_encoder"]}


def device_defaults() -> dict[str, Any]:
    """What every preset adds on this machine: on a CPU no step-0 samples (the base model's images, a
    validation that costs as much as many training steps there; Sample shows the base model anyway)."""
    import torch

    return {} if torch.cuda.is_available() else {"skip_initial_validation": True}


def instance_prompt_for(preset: str, trigger: str, class_word: str) -> str:
    if preset == "style":
        return f"an image in the style of {trigger}"
    return f"a photo of {trigger} {class_word}"
