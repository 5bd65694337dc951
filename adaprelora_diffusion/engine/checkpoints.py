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

import hashlib
import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import staged_dir
from .errors import TrainingError

logger = logging.getLogger(__name__)

__all__ = ["LoopState", "save_checkpoint", "load_checkpoint", "load_params", "list_checkpoints", "resolve_checkpoint", "verify_checkpoint",
           "read_run_config", "remove_stale_temporaries", "CheckpointError"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
_STATE_FILE = "training_state.json"  # the loop's position
_PARAMS_FILE = "lora_params.safetensors"  # the trained tensors, by name
MANIFEST = "manifest.json"  # sha256 and size of every other file, written last: it marks a complete checkpoint
RUN_CONFIG = "run_config.json"  # the settings the run had when it wrote the checkpoint


class CheckpointError(TrainingError):
    """A checkpoint that cannot be written or read; the message names the file and what is intact.
    A `TrainingError`, so trainers and commands pass it on as it is."""


@dataclass
class LoopState:
    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # data-loader batches of `epoch` already consumed
    skipped_steps: int = 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(output_dir: Path, state: LoopState, *, params: dict[str, torch.Tensor], optimizer, lr_scheduler,
                    scaler=None, total_limit: int | None = None, run_config: dict | None = None) -> Path:
    """Write `output_dir/checkpoint-<step>` atomically, with a checksum manifest; then keep at most
    `total_limit` of them. Any failure (a full disk included: torch reports it as RuntimeError)
    removes the partial folder and raises CheckpointError; earlier checkpoints stay intact."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{state.global_step}"
    try:
        with staged_dir(final) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp / _PARAMS_FILE))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            (tmp / _STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
            if run_config is not None:
                (tmp / RUN_CONFIG).write_text(json.dumps(run_config, indent=2, default=str))
            files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=2))
    except Exception as err:  # OSError, torch's RuntimeError on ENOSPC, safetensors' own error type
        previous = list_checkpoints(output_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"Could not write checkpoint {final} ({reason}); {kept}. Free disk space, then resume with "
            "--resume_from_checkpoint latest."
        ) from err
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a manifest), oldest first; their files are not verified here."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError naming the first file that is missing, truncated or altered."""
    path = Path(path)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"Checkpoint {path} has no readable {MANIFEST} ({err}): it is incomplete or damaged.") from err
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"Checkpoint {path} is damaged: {file} is missing.")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"Checkpoint {path} is damaged: {file} has {size} bytes, {expected['bytes']} were written (truncated?).")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"Checkpoint {path} is damaged: {file} does not match its checksum (altered on disk).")


def resolve_checkpoint(output_dir: Path, spec: str) -> Path | None:
    """The checkpoint to resume from, verified against its manifest.

    'latest': the newest intact checkpoint (None if there is none yet); damaged newer ones are
    skipped with a warning that names them. An explicit folder must be intact, or this is an error.
    """
    if spec == "latest":
        found = list_checkpoints(output_dir)
        for path in reversed(found):
            try:
                verify_checkpoint(path)
            except CheckpointError as err:
                logger.warning("%s Falling back to an earlier checkpoint.", err)
                continue
            return path
        if found:
            raise CheckpointError(f"Every checkpoint in {output_dir} is damaged ({', '.join(p.name for p in found)}): "
                                  "start again with --overwrite_output_dir.")
        return None
    path = Path(spec)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"--resume_from_checkpoint {spec}: not a complete checkpoint folder (no {MANIFEST}). "
                              f"Use 'latest' or one of: {', '.join(map(str, list_checkpoints(output_dir))) or 'none yet'}.")
    verify_checkpoint(path)
    return path


def read_run_config(path: Path) -> dict | None:
    """The settings saved with a checkpoint (None for checkpoints written without them)."""
    file = Path(path) / RUN_CONFIG
    return json.loads(file.read_text()) if file.is_file() else None


def remove_stale_temporaries(output_dir: Path) -> list[str]:
    """Delete the hidden partial folders a killed run left (``.checkpoint-N.tmp-*``, ``.*.stale-*``).

    Call only while holding the output folder's lock: another live run's temporaries look the same.
    """
    removed = []
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return removed
    for p in output_dir.iterdir():
        if p.name.startswith(".checkpoint-") and (".tmp-" in p.name or ".stale-" in p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def load_params(path: Path, params: dict[str, torch.Tensor]) -> None:
    """Copy a (verified) checkpoint's trained tensors into ``params`` (by name); the names must match exactly."""
    path = Path(path)
    saved = load_file(str(path / _PARAMS_FILE))
    missing, unexpected = set(params) - set(saved), set(saved) - set(params)
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {path} does not match this run's LoRA parameters (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}): resume with the same --rank, --lora_target_modules and --train_text_encoder."
        )
    with torch.no_grad():
        for name, tensor in params.items():
            tensor.copy_(saved[name])


def load_checkpoint(path: Path, *, params: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler=None) -> LoopState:
    """Restore a (verified) checkpoint into live objects; returns where the loop stood."""
    path = Path(path)
    load_params(path, params)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu"))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    return LoopState(**json.loads((path / _STATE_FILE).read_text()))
