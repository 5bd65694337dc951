"""accelerate set-up and tear-down that every trainer here needs."""

from __future__ import annotations

import time

import torch

from .errors import TrainingError

__all__ = ["fresh_accelerator_state", "check_ranks_in_sync", "let_collectives_settle"]


def fresh_accelerator_state() -> None:
    """Let one process train several times with different settings (the web app does).

    accelerate keeps its state in process-wide singletons that refuse a second Accelerator with,
    say, another mixed precision. There is no public reset; its own test-suite uses these. The
    process-level state (device, process group) is kept when a process group exists.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    GradientState._reset_state()


def check_ranks_in_sync(accelerator, params: dict[str, torch.Tensor]) -> None:
    """Data-parallel ranks must hold identical trained weights; saving rank 0's would hide a bug."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in params.values()]).sum().reshape(1).to(accelerator.device)
    gathered = accelerator.gather(checksum)
    if not torch.all(gathered == gathered[0]):
        raise TrainingError(f"Data-parallel ranks hold different weights (checksums {gathered.tolist()}); this is a bug, please report it.")


def let_collectives_settle(accelerator) -> None:
    """Avoid a teardown deadlock of torch's gloo backend after the run's last collective.

    Seen with torch 2.13 on CPU (2 processes): when training returns, the DDP Reducer is freed
    with the GIL held and its ProcessGroupGloo destructor joins gloo's worker thread, while that
    thread is still destroying the last collective's work object and waits for the GIL to drop
    a tensor's Python reference. A barrier, then a short sleep (which releases the GIL), lets
    the worker finish first. No collective may follow this call.
    """
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(0.2)
