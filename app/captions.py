"""Default captions, and the place where an automatic captioner plugs in (none ships: out of scope).

A captioner is any callable ``(PIL.Image, instance_prompt) -> str``. Register one with
``register_captioner("blip", fn)`` before the page is built (e.g. in a small launcher script
that then calls ``app.cli.main()``); the page's "Suggest captions" button then uses the most
recently registered one instead of repeating the instance prompt.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

__all__ = ["Captioner", "register_captioner", "active_captioner", "suggest_caption"]

Captioner = Callable[[Image.Image, str], str]
_CAPTIONERS: dict[str, Captioner] = {}


def register_captioner(name: str, captioner: Captioner) -> None:
    _CAPTIONERS[name] = captioner


def active_captioner() -> tuple[str, Captioner] | None:
    if not _CAPTIONERS:
        return None
    name = list(_CAPTIONERS)[-1]
    return name, _CAPTIONERS[name]


def suggest_caption(image_path: str, instance_prompt: str) -> str:
    """The registered captioner's caption, or the instance prompt when none is registered."""
    chosen = active_captioner()
    if chosen is None:
        return instance_prompt
    with Image.open(image_path) as im:
        return chosen[1](im.convert("RGB"), instance_prompt).strip() or instance_prompt
