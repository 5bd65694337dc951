"""The error a trainer raises for a run that cannot go on."""

__all__ = ["TrainingError"]


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""
