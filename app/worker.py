"""``python -m app.worker <job folder>``: train one job through the trainer's library API.

The loop is ``adaprelora_diffusion.dreambooth.train`` itself; this process only turns the job's
folder into a ``TrainConfig``, writes the trainer's progress events to ``events.jsonl``, turns
SIGTERM (or the job's ``stop`` file, which the page's Stop writes) into ``should_stop`` (the
trainer then finishes the step, writes a checkpoint and the LoRA), and records the outcome in
``state.json``. A job that ran before resumes from its newest intact checkpoint, bit-identically.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from adaprelora_diffusion.engine.command import error_text
from adaprelora_diffusion.engine.lock import try_lock

from . import jobs
from .events import ATTEMPT, EVENTS_NAME, EventLog
from .scheduler import LOCK_FD_ENV, start_next
from .workspace import Workspace

logger = logging.getLogger("app.worker")

__all__ = ["main", "job_config", "StopRequest", "HOLD_ENV"]

#: Test hook: the path of a JSON file ``{job id or "*": step or null}``. While it exists and names a step
#: for this job (its id, else "*"), the worker waits after reporting that step or a later one: tests hold
#: a job at a known step however fast the machine is, instead of racing it. Unset (always, outside
#: tests), nothing waits.
HOLD_ENV = "ADAPRELORA_WORKER_HOLD"


def job_config(job_dir: Path):
    """The job's TrainConfig: its settings plus its own folders; ``latest`` once an earlier attempt wrote output."""
    from adaprelora_diffusion.dreambooth import TrainConfig

    train = dict(jobs.read_job(job_dir)["train"])
    output = jobs.output_dir(job_dir)
    earlier = output.is_dir() and any(output.iterdir())
    return TrainConfig(**train, instance_data_dir=str(jobs.uploads_dir(job_dir)), output_dir=str(output),
                       class_data_dir=str(job_dir / "class_images") if train.get("with_prior_preservation") else None,
                       resume_from_checkpoint="latest" if earlier else None)


class StopRequest:
    """``should_stop`` for train(): true after SIGTERM/SIGINT or once the job's ``stop`` file exists."""

    def __init__(self, job_dir: Path):
        self.path = jobs.stop_path(job_dir)
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signal = signum
        logger.warning("%s: stopping after this step and saving a checkpoint.", signal.Signals(signum).name)

    def __call__(self) -> bool:
        return self.signal is not None or self.path.exists()


class _WithoutBars:
    """stderr minus progress-bar redraws (tqdm's carriage returns): the log stays readable, and
    events.jsonl carries the progress. Everything else (warnings, tracebacks) passes through."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        if "\r" in text:  # a bar redraw; warnings and tracebacks carry none
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class _LoggedEvents(EventLog):
    """Events to the file, and a readable line to the log every few percent."""

    def __call__(self, event) -> None:
        super().__call__(event)
        every = max(1, (event.max_steps or 1) // 20)
        if event.kind != "step" or event.step % every == 0:
            loss = "-" if event.loss is None else f"{event.loss:.4f}"
            logger.info("%s %d/%d loss %s %s", event.kind, event.step, event.max_steps, loss, event.message or "")
        if event.kind == "step":
            _hold(self.path.parent.name, event.step)


def _hold(job_id: str, step: int) -> None:
    """The test hook HOLD_ENV: wait here while its file names a step <= ``step`` for this job."""
    path = os.environ.get(HOLD_ENV)
    while path:
        try:
            holds = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return
        at = holds.get(job_id, holds.get("*"))
        if at is None or step < at:
            return
        time.sleep(0.05)


def _hold_lock(job_dir: Path) -> int:
    """The job's lock: inherited from the scheduler, or taken here when started by hand."""
    inherited = os.environ.pop(LOCK_FD_ENV, None)
    if inherited is not None:
        return int(inherited)
    fd = try_lock(jobs.lock_path(job_dir))
    if fd is None:
        raise SystemExit(f"Job {job_dir.name} already has a live worker.")
    jobs.update_state(job_dir, state=jobs.JobState.RUNNING, pid=os.getpid(), started_at=time.time(), error=None)
    return fd


def _train(job_dir: Path) -> tuple[jobs.JobState, str | None]:
    """Run the trainer; (final state, error message). Errors are one line, as the commands print them
    (engine.command); the log keeps the traceback."""
    from adaprelora_diffusion.dreambooth import train

    stop = StopRequest(job_dir)
    try:
        config = job_config(job_dir)
        result = train(config, progress=_LoggedEvents(job_dir / EVENTS_NAME), should_stop=stop)
    except Exception as err:
        logger.error("%s", traceback.format_exc())
        return jobs.JobState.FAILED, error_text(err)
    final = jobs.JobState.STOPPED if result.stopped_early else jobs.JobState.DONE
    logger.info("%s: %d steps in %.0fs; LoRA: %s", final.value, result.global_step, result.seconds, result.lora_path)
    return final, None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m app.worker <job folder>", file=sys.stderr)
        return 2
    job_dir = Path(argv[0]).resolve()
    sys.stderr = _WithoutBars(sys.stderr)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    logging.captureWarnings(True)
    lock_fd = _hold_lock(job_dir)
    logger.info("Worker pid %d for job %s", os.getpid(), job_dir.name)
    EventLog(job_dir / EVENTS_NAME).write(ATTEMPT, pid=os.getpid())  # the status shows this attempt once it starts
    final, error = _train(job_dir)
    jobs.update_state(job_dir, state=final, error=error, finished_at=time.time())
    os.close(lock_fd)  # after the final state is on disk: a free lock with "running" means a dead worker
    ws = Workspace(job_dir.parent.parent)
    try:
        if not ws.app_alive():  # a live app starts the next job itself (and, as its parent, sees how it ends)
            start_next(ws)  # the queue drains even while the app is down
    except Exception:
        logger.exception("Could not start the next queued job")
    return 0 if final != jobs.JobState.FAILED else 1


if __name__ == "__main__":
    sys.exit(main())
