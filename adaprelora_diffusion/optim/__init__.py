"""LoRA optimizers: AdaPreLoRA and the baselines it is compared with, behind one factory."""

from .adaprelora import DEFAULT_STATS, MOMENTUM_CHOICES, STATS_CHOICES, AdaPreLoRA
from .factory import OPTIMIZER_SETTINGS, OPTIMIZERS, make_optimizer, optimizer_kwargs
from .lorapro import LoRAPro
from .pairs import LoraPair, find_lora_pairs
from .settings import ADAPRELORA_SETTINGS, Setting

__all__ = ["ADAPRELORA_SETTINGS", "AdaPreLoRA", "DEFAULT_STATS", "LoRAPro", "LoraPair", "MOMENTUM_CHOICES", "OPTIMIZERS", "OPTIMIZER_SETTINGS",
           "STATS_CHOICES", "Setting", "find_lora_pairs", "make_optimizer", "optimizer_kwargs"]
