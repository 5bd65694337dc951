"""LoRA optimizers: AdaPreLoRA and the baselines it is compared with, behind one factory."""

from .adaprelora import DEFAULT_STATS, AdaPreLoRA
from .factory import OPTIMIZERS, make_optimizer
from .lorapro import LoRAPro
from .pairs import LoraPair, find_lora_pairs

__all__ = ["AdaPreLoRA", "DEFAULT_STATS", "LoRAPro", "LoraPair", "OPTIMIZERS", "find_lora_pairs", "make_optimizer"]
