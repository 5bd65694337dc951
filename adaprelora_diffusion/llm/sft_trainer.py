"""`AdaPreLoRASFTTrainer`: TRL's `SFTTrainer` (chat templates, loss masks, packing) with the same mixin.

Kept apart from trainer.py because TRL is the optional extra ``[llm]``.
"""

from __future__ import annotations

try:
    from trl import SFTTrainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("AdaPreLoRASFTTrainer and the adaprelora-llm command need TRL: "
                      "pip install 'adaprelora-diffusion[llm]'") from err

from .trainer import AdaPreLoRAMixin

__all__ = ["AdaPreLoRASFTTrainer"]


class AdaPreLoRASFTTrainer(AdaPreLoRAMixin, SFTTrainer):
    """TRL's `SFTTrainer` with AdaPreLoRA (or any `make_optimizer` name) built from its `SFTConfig`."""
