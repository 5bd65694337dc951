"""What a model argument that is not a local path must look like to be tried on the Hub."""

from __future__ import annotations

import re

__all__ = ["HUB_ID", "looks_like_hub_id"]

#: owner/name, as the Hub spells repository ids
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BARE_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")  # legacy ids without an owner (gpt2, bert-base-uncased)


def looks_like_hub_id(raw: str, bare_names: bool = False) -> bool:
    """Whether ``raw`` (not an existing local path) can be a Hub id; ``bare_names`` also allows ids without owner."""
    if raw.startswith((".", "~", "/")) or raw.endswith("/"):
        return False
    return bool(HUB_ID.match(raw) or (bare_names and _BARE_NAME.match(raw)))
