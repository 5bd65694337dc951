"""A client's settings dict -> the trainer's TrainConfig values, checked, with the app's defaults.

Keys are the trainer's flag names without dashes (``rank``, ``learning_rate``, ``max_train_steps``
...: ``TrainConfig``'s fields) plus the app's own: ``name``, ``preset``, ``trigger_word``,
``class_word`` and ``captions`` (``{file name: caption}``). Folders are the app's business
(each job has its own), so the path flags are refused rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from adaprelora_diffusion.dreambooth.config import REAL_DEFAULTS, TrainConfig
from adaprelora_diffusion.dreambooth.model_loading import model_defaults, resolve_model_source

from .errors import AppError
from .models import resolve_model
from .presets import PRESETS, device_defaults, instance_prompt_for, preset_values

__all__ = ["JobSettings", "parse_settings", "TRAIN_KEYS", "APP_KEYS", "APP_SET_KEYS"]

TRAIN_KEYS = {f.name: str(f.type) for f in fields(TrainConfig)}
APP_KEYS = ("name", "preset", "trigger_word", "class_word", "captions")
#: set by the app for every job (its folders, resuming); a client sending them is told so
APP_SET_KEYS = ("instance_data_dir", "output_dir", "class_data_dir", "logging_dir", "resume_from_checkpoint",
                "overwrite_output_dir")
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_CLASS = re.compile(r"^[A-Za-z][A-Za-z0-9 _-]{0,47}$")
_NAME = re.compile(r"^[\w][\w .,()+-]{0,79}$")
_MAX_PROMPT = 1000


@dataclass
class JobSettings:
    name: str
    preset: str
    trigger_word: str
    class_word: str
    captions: dict[str, str]
    train: dict[str, Any]  # TrainConfig fields, without the folders
    model_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def resolution(self) -> int:
        return int(self.train.get("resolution") or self.model_defaults.get("resolution") or REAL_DEFAULTS["resolution"])


def _coerce(key: str, value: Any) -> Any:
    """``value`` as the type of TrainConfig's field ``key`` (JSON gives ints for floats, and so on)."""
    kind = TRAIN_KEYS[key]
    optional = kind.endswith("| None")
    base = kind.replace("| None", "").strip()
    if value is None:
        if optional:
            return None
        raise AppError(f"settings[{key!r}] cannot be empty (null).")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise AppError(f"settings[{key!r}] must be true or false, got {value!r}.")
    if base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise AppError(f"settings[{key!r}] must be a whole number, got {value!r}.")
    if base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise AppError(f"settings[{key!r}] must be a number, got {value!r}.")
    if not isinstance(value, str):
        raise AppError(f"settings[{key!r}] must be text, got {type(value).__name__}.")
    if len(value) > _MAX_PROMPT or any(ord(c) < 32 for c in value):
        raise AppError(f"settings[{key!r}] must be one line of at most {_MAX_PROMPT} characters.")
    return value


def _text(settings: Mapping[str, Any], key: str, default: str, pattern: re.Pattern, example: str) -> str:
    value = settings.get(key, default)
    if value is None or value == "":
        value = default
    if not isinstance(value, str) or not pattern.match(value.strip()):
        raise AppError(f"settings[{key!r}] = {str(value)[:60]!r} is not allowed: use {example}.")
    return value.strip()


def _captions(value: Any) -> dict[str, str]:
    if value in (None, ""):
        return {}
    if not isinstance(value, Mapping):
        raise AppError("settings['captions'] must be an object {file name: caption}.")
    out = {}
    for name, caption in value.items():
        if not isinstance(name, str) or not isinstance(caption, str):
            raise AppError("settings['captions'] must map file names (text) to captions (text).")
        if len(caption) > _MAX_PROMPT or any(ord(c) < 32 for c in caption):
            raise AppError(f"The caption of {name[:80]!r} must be one line of at most {_MAX_PROMPT} characters.")
        out[name] = caption.strip()
    return out


def parse_settings(settings: Any, model_dirs: Sequence[Path]) -> JobSettings:
    """Check every key and value; fill the preset's and the app's defaults; validate as the trainer would."""
    if settings is None:
        settings = {}
    if not isinstance(settings, Mapping):
        raise AppError(f"settings must be an object (dict), got {type(settings).__name__}.")
    unknown = sorted(k for k in settings if k not in TRAIN_KEYS and k not in APP_KEYS)
    if unknown:
        raise AppError(f"Unknown settings {unknown[:5]}: use the trainer's flag names without dashes (e.g. 'rank', "
                       f"'learning_rate', 'max_train_steps') or {', '.join(APP_KEYS)}.")
    app_set = [k for k in APP_SET_KEYS if k in settings]
    if app_set:
        raise AppError(f"settings {app_set} are chosen by the app (each job has its own folders; use Resume to continue "
                       "a job): drop them.")
    preset = settings.get("preset") or "object"
    if preset not in PRESETS:
        raise AppError(f"Unknown preset {preset!r}: choose one of {', '.join(PRESETS)}.")
    model = resolve_model(settings.get("pretrained_model_name_or_path"), model_dirs)
    recommended = {k: v for k, v in model_defaults(resolve_model_source(model)[1]).items()
                   if k not in ("instance_data_dir", "instance_prompt")}
    explicit = {k: _coerce(k, v) for k, v in settings.items() if k in TRAIN_KEYS and k != "pretrained_model_name_or_path"}
    train = {**preset_values(preset, recommended), **device_defaults(), **explicit, "pretrained_model_name_or_path": model}

    trigger = _text(settings, "trigger_word", "sks", _WORD, "one word of letters, digits, '-' or '_' (e.g. sks)")
    class_word = _text(settings, "class_word", "person" if preset == "person" else "object", _CLASS,
                       "a short class name of letters and spaces (e.g. dog, robot toy)")
    name = _text(settings, "name", f"{trigger} {class_word}", _NAME, "letters, digits, spaces and .,()+- (80 at most)")
    train.setdefault("instance_prompt", instance_prompt_for(preset, trigger, class_word))
    if train.get("with_prior_preservation"):
        train.setdefault("class_prompt", f"a photo of a {class_word}")
    steps = train.get("max_train_steps") or recommended.get("max_train_steps") or REAL_DEFAULTS["max_train_steps"]
    # a quarter of the run, rounded up: the last interval ends at or before the final step, never just before it
    # (150 steps // 4 = 37 would sample at 148 and again at 150)
    every = max(1, -(-steps // 4))
    train.setdefault("checkpointing_steps", every)  # several checkpoints: Stop/Resume and the grid use them
    train.setdefault("validation_steps", every)
    train.setdefault("output_kohya_format", True)  # the download carries both files
    train.setdefault("report_to", "none")  # the page plots the loss itself

    probe = dataclasses.replace(TrainConfig(**train), instance_data_dir="uploads", output_dir="output",
                                class_data_dir="class_images" if train.get("with_prior_preservation") else None)
    try:
        probe.validate()
    except ValueError as err:
        raise AppError(str(err).replace("Invalid training settings", "Invalid settings")) from err
    return JobSettings(name=name, preset=preset, trigger_word=trigger, class_word=class_word,
                       captions=_captions(settings.get("captions")), train=train, model_defaults=recommended)
