"""Keyed randomness: every random draw of a run comes from a generator seeded by a key.

A key is a tuple of integers, e.g. (seed, stream, step, micro-step, sample position). Nothing
random needs to be saved in a checkpoint: a resumed run draws the same numbers at the same
steps, and N processes with batch b draw what one process with batch N*b draws.
"""

from __future__ import annotations

import torch

__all__ = ["mix", "keyed_generator", "keyed_randn"]


def mix(*values: int) -> int:
    """A 63-bit seed from integers (FNV-1a style; the same across processes and Python runs)."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from ``key``."""
    return torch.Generator().manual_seed(mix(*key))


def keyed_randn(shape, *key: int) -> torch.Tensor:
    """Standard normal CPU noise of ``shape`` drawn from ``key`` alone."""
    return torch.randn(shape, generator=keyed_generator(*key))
