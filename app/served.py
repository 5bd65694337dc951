"""The files the app hands to Gradio to serve: per-user copies, served only to their user, bounded.

Gradio 6 serves every file under its own folder (``GRADIO_TEMP_DIR``, here ``<workspace>/.gradio``)
to any client that names the path, logged in as anyone (``/gradio_api/file=<path>``:
``gradio.route_utils.file_fetch`` checks only the blocked, allowed and created paths; nothing in
it knows a session or a user). So a file one user saw or downloaded would be another user's for
the asking. The app closes that itself:

* Every file a handler returns (samples, thumbnails, downloads) is a copy made here, in the
  caller's own folder ``.gradio/served/<user key>/<content digest>/<name>``. The same content for
  the same user is one copy however often it is shown (a page watching a job sends each image
  once, and a repeat costs no disk).
* ``ServedFilesGuard``, an ASGI middleware in front of Gradio's routes, answers 403 to a request
  for any path under ``.gradio`` unless it lies in the requesting user's own ``served`` folder.
  The user is the one Gradio's login cookie names (``App.tokens``, the table Gradio's own login
  check reads), ``""`` without ``--auth``; so raw uploads (``.gradio/<sha>/<name>``, Gradio's) are
  never served back to anyone, and a served copy only to its user. Without logins every client
  is the same user, as they see the same jobs.
* Copies older than ``MAX_AGE`` are swept on each new copy, and the whole ``.gradio`` folder is
  emptied when the app starts, so nothing served before a restart is served after it.

Why not unguessable names alone (the other option): a URL leaks (browser history, logs, a shared
screenshot) and stays valid for as long as the file exists; the guard makes the URL useless to
anyone but its user.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["ServedFiles", "ServedFilesGuard", "user_key", "MAX_AGE"]

MAX_AGE = 3600  # seconds a copy is kept after it was last handed out
_FILE_ROUTE = re.compile(r"^/(?:gradio_api/)?file[=/](.+)$")


def user_key(user: str) -> str:
    """The folder name of ``user``'s copies (a digest: any login name makes a safe path)."""
    return hashlib.sha256(f"adaprelora-app-user:{user}".encode()).hexdigest()[:16]


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


class ServedFiles:
    """Per-user copies under ``<gradio folder>/served`` (see the module docstring)."""

    def __init__(self, gradio_dir: Path, max_age: float = MAX_AGE):
        self.gradio_dir = Path(gradio_dir)
        self.root = self.gradio_dir / "served"
        self.max_age = max_age

    def reset(self) -> None:
        """Empty Gradio's whole folder (at start: nothing served or uploaded before a restart survives it)."""
        if self.gradio_dir.is_dir():
            for entry in self.gradio_dir.iterdir():
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self.gradio_dir.mkdir(parents=True, exist_ok=True)

    def serve(self, user: str, source: Path, name: str | None = None) -> str:
        """A copy of ``source`` in ``user``'s folder (the existing one if this content was served before);
        the path to return to Gradio."""
        self.sweep()
        folder = self.root / user_key(user) / _digest(source)
        target = folder / (name or source.name)
        if target.is_file():
            os.utime(target)  # handed out again: young again (and Gradio's delete_cache ages by ctime)
            os.utime(folder)
            return str(target)
        folder.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as src, tempfile.NamedTemporaryFile(dir=folder, prefix=".partial-", delete=False) as tmp:
            shutil.copyfileobj(src, tmp)
        os.replace(tmp.name, target)
        return str(target)

    def scratch(self) -> tempfile.TemporaryDirectory:
        """A temporary folder beside the copies, for a file to be built and then served (removed on exit)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(dir=self.root, prefix=".scratch-")

    def serve_image(self, user: str, image: Any, name: str) -> str:
        """A PIL image saved as ``name`` in ``user``'s folder."""
        with self.scratch() as scratch:
            path = Path(scratch) / name
            image.save(path)
            return self.serve(user, path)

    def sweep(self) -> None:
        """Remove copies not handed out for ``max_age`` seconds (and partial copies a crash left), and the
        empty ``tmp*`` files Gradio's File component leaves in its folder each time it reads an upload
        (``gradio/components/file.py``: ``_process_single_file`` opens a NamedTemporaryFile it never uses)."""
        now = time.time()
        if self.gradio_dir.is_dir():
            for leftover in self.gradio_dir.glob("tmp*"):
                try:
                    if leftover.is_file() and leftover.stat().st_size == 0 and now - leftover.stat().st_mtime > 60:
                        leftover.unlink()
                except FileNotFoundError:
                    continue
        if not self.root.is_dir():
            return
        for user_dir in self.root.iterdir():
            if not user_dir.is_dir():
                continue
            for folder in user_dir.iterdir():  # content folders, and scratch ones a crash left
                try:
                    if now - folder.stat().st_mtime > self.max_age:
                        shutil.rmtree(folder, ignore_errors=True) if folder.is_dir() else folder.unlink()
                except FileNotFoundError:
                    continue

    def size_bytes(self) -> int:
        """Bytes under Gradio's whole folder (what a long session leaves on disk)."""
        return sum(p.stat().st_size for p in self.gradio_dir.rglob("*") if p.is_file())

    def may_serve(self, user: str | None, path: str) -> bool | None:
        """For a file request of ``path``: True (its user's copy), False (refuse), None (not ours: Gradio decides)."""
        try:
            real = Path(os.path.realpath(path))
            gradio = Path(os.path.realpath(self.gradio_dir))
        except (OSError, ValueError):
            return False
        if real != gradio and gradio not in real.parents:
            return None
        if user is None:
            return False
        own = Path(os.path.realpath(self.root / user_key(user)))
        return own in real.parents


class ServedFilesGuard:
    """ASGI middleware: Gradio's file routes serve a path under ``.gradio`` only to its user (see above)."""

    def __init__(self, app, served: ServedFiles):
        self.app, self.served = app, served

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            match = _FILE_ROUTE.match(scope.get("path", ""))
            if match and "://" not in match.group(1):
                allowed = self.served.may_serve(_current_user(scope), match.group(1))
                if allowed is False:
                    from starlette.responses import PlainTextResponse

                    await PlainTextResponse("File not allowed.", status_code=403)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _current_user(scope) -> str | None:
    """The logged-in user of a request as Gradio's own login check sees it ("" without logins, None if not logged in)."""
    from starlette.requests import HTTPConnection

    app = scope.get("app")
    if getattr(app, "auth", None) is None:  # no --auth: every client is the same (nameless) user
        return ""
    cookies = HTTPConnection(scope).cookies
    cookie_id = getattr(app, "cookie_id", "")
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return getattr(app, "tokens", {}).get(token)
