"""LLM fine-tuning with AdaPreLoRA in transformers, peft and TRL.

The simplest path is transformers' own Trainer with the optimizer passed in::

    trainer = Trainer(model=peft_model, args=args,
                      optimizers=(make_optimizer("adaprelora", peft_model, lr=args.learning_rate), None))

`AdaPreLoRATrainer` (and `AdaPreLoRASFTTrainer` for TRL) build the optimizer from ``args`` plus an
`AdaPreLoRASettings`, and handle the traps (see trainer.py). The ``adaprelora-llm`` command is
in cli.py. This room imports optim and engine, never the diffusion trainer.
"""

from .settings import AdaPreLoRAArguments, AdaPreLoRASettings, optimizer_settings
from .trainer import AdaPreLoRAMixin, AdaPreLoRATrainer, MakeOptimizer, optimizer_cls_and_kwargs

__all__ = ["AdaPreLoRAArguments", "AdaPreLoRAMixin", "AdaPreLoRASFTTrainer", "AdaPreLoRASettings", "AdaPreLoRATrainer",
           "MakeOptimizer", "optimizer_cls_and_kwargs", "optimizer_settings"]


def __getattr__(name):
    if name == "AdaPreLoRASFTTrainer":  # TRL is optional: imported when asked for
        from .sft_trainer import AdaPreLoRASFTTrainer

        return AdaPreLoRASFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
