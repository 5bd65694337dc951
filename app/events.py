"""The trainer's progress events as a file: the worker appends, the page and the API read.

One JSON object a line (``kind``, ``step``, ``max_steps``, ``loss``, ``lr``, ``time``,
``message``), appended and flushed per event, so a reader never needs the worker to be alive
and a page that reconnects finds the whole history. Status reads only the file's tail, so it
stays fast however long the run. Besides the trainer's events, each worker writes an
``attempt`` event when it starts: until that attempt's ``start`` (the trainer has loaded and
resumed), the step shown is the one it resumes from, not the previous attempt's last.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from adaprelora_diffusion.engine.progress import ProgressEvent

__all__ = ["EventLog", "read_events", "progress_summary", "loss_series", "EVENTS_NAME", "ATTEMPT"]

EVENTS_NAME = "events.jsonl"
ATTEMPT = "attempt"  # a worker started; the trainer's own "start" follows once it has loaded and resumed
_TAIL_BYTES = 16_384
_RATE_WINDOW = 20  # step events the ETA's rate is measured over


class EventLog:
    """``progress=`` callback for ``train()``: each event becomes one line of ``events.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, event: ProgressEvent) -> None:
        self.write(event.kind, step=event.step, max_steps=event.max_steps, loss=event.loss, lr=event.lr,
                   message=event.message)

    def write(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, "time": time.time(), **fields}
        if isinstance(record.get("loss"), float) and not math.isfinite(record["loss"]):
            record["loss"] = None
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()


def _parse(lines: list[str]) -> list[dict[str, Any]]:
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a line being written, or the first (cut) line of a tail
    return events


def read_events(path: Path, tail_bytes: int | None = None) -> list[dict[str, Any]]:
    """All events (or those in the last ``tail_bytes`` of the file)."""
    if not path.is_file():
        return []
    with open(path, "rb") as fh:
        if tail_bytes is not None:
            fh.seek(max(0, path.stat().st_size - tail_bytes))
        text = fh.read().decode("utf-8", errors="replace")
    return _parse(text.splitlines())


def progress_summary(path: Path) -> dict[str, Any]:
    """The newest step, total, recent loss and ETA (seconds, from the recent step rate of this attempt);
    ``attempt_pid``, the worker of the newest ``attempt`` event (None if the tail has none), and
    ``started``, whether the trainer's ``start`` came after it (True when the tail has neither)."""
    events = read_events(path, tail_bytes=_TAIL_BYTES)
    marks = [e for e in events if e.get("kind") in (ATTEMPT, "start")]
    attempts = [e for e in marks if e.get("kind") == ATTEMPT]
    summary: dict[str, Any] = {"step": 0, "max_steps": None, "loss": None, "eta_seconds": None,
                               "attempt_pid": attempts[-1].get("pid") if attempts else None,
                               "started": not marks or marks[-1].get("kind") == "start"}
    with_steps = [e for e in events if isinstance(e.get("step"), int)]
    if not with_steps:
        return summary
    last = with_steps[-1]
    summary.update(step=last["step"], max_steps=last.get("max_steps"))
    losses = [e["loss"] for e in events if e.get("kind") == "step" and e.get("loss") is not None]
    if losses:
        summary["loss"] = losses[-1]
    # the rate since the newest start (a resumed run restarts the clock)
    starts = [i for i, e in enumerate(events) if e.get("kind") == "start"]
    steps = [e for e in events[(starts[-1] if starts else 0):] if e.get("kind") == "step"][-_RATE_WINDOW:]
    if len(steps) >= 2 and summary["max_steps"] and last.get("kind") == "step":
        seconds = steps[-1]["time"] - steps[0]["time"]
        done = steps[-1]["step"] - steps[0]["step"]
        if seconds > 0 and done > 0:
            summary["eta_seconds"] = round((summary["max_steps"] - last["step"]) * seconds / done, 1)
    return summary


def loss_series(path: Path, max_points: int = 500) -> list[tuple[int, float]]:
    """(step, loss) of every step, the latest attempt winning where a resumed run repeated steps."""
    by_step: dict[int, float] = {}
    for event in read_events(path):
        if event.get("kind") == "step" and event.get("loss") is not None:
            by_step[event["step"]] = event["loss"]
    points = sorted(by_step.items())
    stride = max(1, math.ceil(len(points) / max_points))
    return points[::stride]
