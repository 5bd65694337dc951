"""Which base models a client may name, and why one cannot be used, in plain words.

A client names a model in ``settings["pretrained_model_name_or_path"]``:

* empty or ``"default"``: the embedded demo model (shipped in the package, no download);
* a folder or a ``.safetensors``/``.ckpt`` file inside one of the model folders the operator
  allowed (``--model-dir``, and ``<workspace>/models``), by its absolute path or its name there;
* a Hub id (``owner/name``), only while the Hub can be reached.

Local paths are checked against the allowed folders before anything is opened, so a client
cannot make the app read (or probe) arbitrary files. The structural checks are the trainer's own
(``model_loading.resolve_model_source``): they name what is missing and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from adaprelora_diffusion.engine.model_source import looks_like_hub_id
from adaprelora_diffusion.dreambooth.model_loading import (SINGLE_FILE_SUFFIXES, check_single_file,
                                                           resolve_model_source)

from .errors import AppError

__all__ = ["DEFAULT_MODEL", "model_choices", "resolve_model"]

DEFAULT_MODEL = "default"
DEFAULT_LABEL = "Embedded demo model (64 px coloured shapes, no download)"


def model_choices(model_dirs: Sequence[Path]) -> list[tuple[str, str]]:
    """(label, value) for the page's list: the embedded model, then the usable local models."""
    choices = [(DEFAULT_LABEL, DEFAULT_MODEL)]
    for root in model_dirs:
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            usable = (entry.is_dir() and (entry / "model_index.json").is_file()) or (
                entry.is_file() and entry.suffix.lower() in SINGLE_FILE_SUFFIXES)
            if usable:
                choices.append((f"{entry.name}  ({root})", str(entry)))
    return choices


def _inside(path: str, roots: Sequence[Path]) -> Path | None:
    """``path`` (absolute, or a name inside a root) normalized without following links, if it lies in a root.

    Links the operator placed in a model folder are honoured (their target is the operator's
    choice); ``..`` in what a client sent is not."""
    candidate = Path(path)
    for root in roots:
        full = Path(os.path.normpath(candidate if candidate.is_absolute() else root / candidate))
        if full != root and root in full.parents:
            return full
    return None


def _check_hub(model_id: str) -> None:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise AppError(f"{model_id!r} looks like a Hugging Face Hub id, but this app runs offline (HF_HUB_OFFLINE is set): "
                       "download the model elsewhere and put its folder or .safetensors file in a model folder.")
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(model_id, timeout=10)
    except Exception as err:  # no network, unknown repo, gated repo: all say the same thing to the user
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise AppError(f"Cannot use the Hub model {model_id!r}: the Hugging Face Hub could not be reached or does not "
                       f"serve it ({type(err).__name__}: {reason}). Check the id and the network, or put the model in a "
                       "model folder.") from err


def resolve_model(value: object, model_dirs: Sequence[Path]) -> str | None:
    """What the trainer gets as ``pretrained_model_name_or_path`` (None: the embedded default)."""
    if value is None or (isinstance(value, str) and value.strip() in ("", DEFAULT_MODEL)):
        return None
    if not isinstance(value, str):
        raise AppError(f"settings['pretrained_model_name_or_path'] must be a string, got {type(value).__name__}.")
    raw = value.strip()
    local = _inside(raw, model_dirs)
    hub_like = looks_like_hub_id(raw) and ".." not in raw
    if local is None or (hub_like and not local.exists()):
        if hub_like:
            _check_hub(raw)
            return raw
        allowed = ", ".join(str(d) for d in model_dirs)
        raise AppError(f"The base model {raw[:200]!r} is neither the embedded default, a model in a model folder ({allowed}), "
                       "nor a Hub id (owner/name): put the model's folder or .safetensors file in a model folder, or start "
                       "the app with --model-dir <its folder>.")
    if not local.exists():
        raise AppError(f"There is no model {local.name!r} in the model folders: choose one from the list.")
    try:
        kind, source = resolve_model_source(str(local))
        if kind == "single_file":
            check_single_file(source)
    except ValueError as err:
        raise AppError(f"The base model {local.name!r} cannot be loaded: {err}") from err
    return source
