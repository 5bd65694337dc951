"""``adaprelora_model.json``: what a model folder says about itself to the trainers.

A pipeline folder may carry this file: what the model is (``kind``, ``notice``, kohya's
``base_model_version``) and the training settings its maker recommends (``training_defaults``:
trainer config fields; a relative ``instance_data_dir`` is relative to the folder). The embedded
demo models are described this way (``demo/descriptor.py`` writes them), so the trainer needs no
knowledge of the demo; ``dreambooth/model_loading.py`` reads them. Both import the format from
here, the floor below both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MODEL_DESCRIPTOR", "model_descriptor"]

MODEL_DESCRIPTOR = "adaprelora_model.json"


def model_descriptor(source: str | os.PathLike) -> dict[str, Any]:
    """The folder's descriptor as a dict (empty for folders without one, and for files and hub ids)."""
    path = Path(source) / MODEL_DESCRIPTOR
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): fix or delete it.") from exc
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(info).__name__}.")
    return info
