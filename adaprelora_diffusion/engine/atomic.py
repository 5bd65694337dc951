"""Atomic writes of files and folders: a reader sees the old version or the new one, never half.

Everything is written beside its target (same file system) under a hidden temporary name,
flushed to disk, then renamed into place with ``os.replace``. The one implementation used for
LoRA weights, checkpoints, sample images, model cards and cached models.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "staged_dir", "replace_dir"]


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def atomic_write(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` for a temporary path beside ``target``, then move it over ``target``.

    On any failure the temporary file is removed and ``target`` keeps its previous content.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_dir(staging: Path, target: Path) -> None:
    """Move the finished folder ``staging`` to ``target``, replacing what was there.

    ``os.replace`` cannot overwrite a non-empty folder, so an existing ``target`` is first moved
    aside (a rename, also atomic) and deleted afterwards. Raises OSError if another process put a
    folder at ``target`` in between; callers that build the same thing concurrently may accept it.
    """
    stale = None
    if target.exists():
        stale = target.parent / f".{target.name}.stale-{uuid.uuid4().hex}"
        try:
            os.replace(target, stale)
        except FileNotFoundError:
            stale = None  # a concurrent writer moved it already
    os.replace(staging, target)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, accept_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success flush it and rename it to ``target``.

    If the body raises, the temporary folder is removed and ``target`` is left as it was. When
    several processes may build the same folder (a cache), ``accept_existing(target)`` says
    whether a folder another process put there meanwhile can be used instead of failing.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                _fsync_file(path)
        try:
            replace_dir(staging, target)
        except OSError:
            if accept_existing is None or not accept_existing(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
