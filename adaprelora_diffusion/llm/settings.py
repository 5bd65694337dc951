"""AdaPreLoRA's own settings for LLM training, and how a Trainer's arguments become optimizer arguments.

`AdaPreLoRASettings` holds what `TrainingArguments` has no field for (statistics, damping,
balance, ...); lr, betas, eps, weight decay and seed come from the `TrainingArguments` as they do
for AdamW. Both it and `AdaPreLoRAArguments` (the ``--adaprelora_*`` flags) are generated from the
settings' one definition, ``optim.settings.ADAPRELORA_SETTINGS``: names, types, defaults, help
text, choices and checks are never written here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..optim import OPTIMIZERS, optimizer_kwargs
from ..optim.settings import ADAPRELORA_SETTINGS, PREFIX, dataclass_fields, normalized, settings_problems

__all__ = ["AdaPreLoRASettings", "AdaPreLoRAArguments", "optimizer_settings", "PREFIX"]


def _check_and_normalize(self) -> None:
    """The "off" spellings become None (``clip_threshold <= 0``, ``beta2_decay == 0``, as on the flags);
    a value the optimizer would refuse is a ValueError naming the setting and what it must be."""
    for name, value in normalized(dataclasses.asdict(self), prefix="").items():
        setattr(self, name, value)
    problems = settings_problems(dataclasses.asdict(self), prefix="", label=lambda name: f"adaprelora {name}")
    if problems:
        raise ValueError(" ".join(problems))


AdaPreLoRASettings = dataclasses.make_dataclass(
    "AdaPreLoRASettings", dataclass_fields(prefix=""),
    namespace={"__module__": __name__, "__post_init__": _check_and_normalize,
               "__doc__": "AdaPreLoRA's settings beyond Adam's (see `AdaPreLoRA` and `optim.settings` for each):\n"
                          + "\n".join(f"``{s.name}`` ({s.default!r}): {s.help}." for s in ADAPRELORA_SETTINGS)})


def _settings_of(self) -> AdaPreLoRASettings:
    return AdaPreLoRASettings(**{s.name: getattr(self, s.flag) for s in ADAPRELORA_SETTINGS})


AdaPreLoRAArguments = dataclasses.make_dataclass(
    "AdaPreLoRAArguments", dataclass_fields(help_prefix="AdaPreLoRA: "),
    namespace={"__module__": __name__, "settings": _settings_of,
               "__doc__": "The ``--adaprelora_*`` flags: `AdaPreLoRASettings` as command-line fields."})


def optimizer_settings(args, optimizer: str, adaprelora: AdaPreLoRASettings | None = None) -> dict[str, Any]:
    """Keyword arguments of `make_optimizer(optimizer, model, **kwargs)` from a `TrainingArguments`.

    lr, betas, eps, weight decay and seed are read from ``args`` for every optimizer (each takes
    what it understands, through `optim.optimizer_kwargs`, the table every trainer here shares);
    ``adaprelora`` adds AdaPreLoRA's own settings.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}.")
    settings = {"betas": (args.adam_beta1, args.adam_beta2), "weight_decay": args.weight_decay,
                "adam_epsilon": args.adam_epsilon, "seed": args.seed}
    settings.update({PREFIX + k: v for k, v in dataclasses.asdict(adaprelora or AdaPreLoRASettings()).items()})
    return {"lr": args.learning_rate, **optimizer_kwargs(optimizer, settings)}
