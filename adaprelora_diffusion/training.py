"""Where ``train`` lived before the package had rooms; kept so existing imports work.

New code imports from :mod:`adaprelora_diffusion.dreambooth`.
"""

from .dreambooth import ProgressEvent, TrainConfig, TrainingError, TrainResult, train

__all__ = ["ProgressEvent", "TrainConfig", "TrainResult", "TrainingError", "train"]
