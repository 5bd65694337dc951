"""The one error type the app shows to people: a plain sentence that names the problem and the fix."""

from __future__ import annotations

__all__ = ["AppError"]


class AppError(ValueError):
    """Refused input or an impossible request; the page shows the message as is (never a traceback)."""
