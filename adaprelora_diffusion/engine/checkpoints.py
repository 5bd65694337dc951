"""Resumable checkpoints of a LoRA run, written atomically.

A checkpoint holds only what a resumed run needs to continue exactly where it stopped: the
trainable (LoRA) parameters, the optimizer and scheduler states, the loss scaler, and the
position in the data. The random streams need no saving: every micro-step reseeds from
(seed, step), and data order and augmentation depend only on (seed, epoch, index).

Written by hand rather than with `accelerate.save_state`, which writes the full models unless
hooks intercept them and writes in place; here everything goes to a temporary sibling folder
that is renamed into place once complete (`atomic.staged_dir`), so a crash or a full disk
leaves the previous checkpoints intact. Nothing here knows what is being trained.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import staged_dir

__all__ = ["LoopState", "save_checkpoint", "load_checkpoint", "list_checkpoints", "resolve_checkpoint", "CheckpointError"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
_STATE_FILE = "training_state.json"  # written last: its presence marks a complete checkpoint


class CheckpointError(RuntimeError):
    pass


@dataclass
class LoopState:
    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # data-loader batches of `epoch` already consumed
    skipped_steps: int = 0


def save_checkpoint(output_dir: Path, state: LoopState, *, params: dict[str, torch.Tensor], optimizer, lr_scheduler,
                    scaler=None, total_limit: int | None = None) -> Path:
    """Write `output_dir/checkpoint-<step>` atomically; then keep at most `total_limit` of them."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{state.global_step}"
    try:
        with staged_dir(final) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp / "lora_params.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            (tmp / _STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    except OSError as err:
        previous = list_checkpoints(output_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(
            f"Could not write checkpoint {final} ({err.strerror or err}); {kept}. Free disk space, then resume with "
            "--resume_from_checkpoint latest."
        ) from err
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and (p / _STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: Path, spec: str) -> Path | None:
    """'latest' (None if there is none yet) or an explicit folder (an error if not a checkpoint)."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / _STATE_FILE).is_file():
        raise CheckpointError(f"--resume_from_checkpoint {spec}: not a complete checkpoint folder (no {_STATE_FILE}). "
                              f"Use 'latest' or one of: {', '.join(map(str, list_checkpoints(output_dir))) or 'none yet'}.")
    return path


def load_checkpoint(path: Path, *, params: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler=None) -> LoopState:
    """Restore a checkpoint into live objects; returns where the loop stood."""
    path = Path(path)
    saved = load_file(str(path / "lora_params.safetensors"))
    missing, unexpected = set(params) - set(saved), set(saved) - set(params)
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {path} does not match this run's LoRA parameters (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}): resume with the same --rank, --lora_target_modules and --train_text_encoder."
        )
    with torch.no_grad():
        for name, tensor in params.items():
            tensor.copy_(saved[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu"))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    return LoopState(**json.loads((path / _STATE_FILE).read_text()))
