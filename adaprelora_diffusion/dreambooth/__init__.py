"""The Stable Diffusion DreamBooth LoRA trainer: config, model loading, data, LoRA files, the loop.

Library entry point: ``train(TrainConfig(...), progress=..., should_stop=...)``.
"""

from .config import TrainConfig, parse_config
from .trainer import ProgressEvent, TrainingError, TrainResult, train

__all__ = ["ProgressEvent", "TrainConfig", "TrainResult", "TrainingError", "parse_config", "train"]
