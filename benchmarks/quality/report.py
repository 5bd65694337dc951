"""What every quality report shares: seed statistics, the device line and strict JSON output."""

from __future__ import annotations

import json
import math
import platform
import statistics
from pathlib import Path

import torch

__all__ = ["cpu_name", "mean_std", "strict_json", "write_report"]


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample std over seeds; a non-finite value (a diverged run) makes the mean inf."""
    if not all(math.isfinite(v) for v in values):
        return {"mean": math.inf, "std": math.nan}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def cpu_name() -> str:
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def strict_json(value):
    """Non-finite floats (diverged runs) become null, so the file is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_report(out: Path, stem: str, text: str, payload: dict) -> None:
    """``<out>/<stem>.md`` and ``<out>/<stem>.json`` (standard JSON, non-finite as null)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(strict_json(payload), indent=2, allow_nan=False))
