"""The non-finite guard: skip optimizer steps whose loss or gradient is not finite, and stop a
run that keeps producing them before it saves diverged weights."""

from __future__ import annotations

import logging

from .errors import TrainingError

__all__ = ["NonFiniteGuard"]

logger = logging.getLogger(__name__)


class NonFiniteGuard:
    """Counts skipped steps; raises after ``max_consecutive`` of them in a row."""

    def __init__(self, max_consecutive: int, advice: str = "Lower the learning rate, then resume from the last checkpoint."):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}.")
        self.max_consecutive = max_consecutive
        self.advice = advice
        self.consecutive = 0

    def record(self, finite: bool, step: int) -> None:
        """Note whether optimizer step ``step`` was applied (finite) or skipped."""
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        logger.warning("Step %d skipped: non-finite loss or gradient (%d in a row).", step, self.consecutive)
        if self.consecutive >= self.max_consecutive:
            raise TrainingError(
                f"{self.consecutive} steps in a row had a non-finite loss or gradient (last at step {step}); "
                f"stopping without saving those weights. {self.advice}"
            )
