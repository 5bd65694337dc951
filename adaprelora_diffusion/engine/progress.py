"""Progress events: what a trainer tells its caller (a progress bar, the web app, a benchmark)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ProgressEvent"]


@dataclass
class ProgressEvent:
    kind: str  # "start", "step", "validation", "checkpoint", "done", "stopped"
    step: int
    max_steps: int
    loss: float | None = None
    lr: float | None = None
    images: list[Any] = field(default_factory=list)  # PIL images with "validation"
    message: str = ""
