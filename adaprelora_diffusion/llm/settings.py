"""AdaPreLoRA's own settings for LLM training, and how a Trainer's arguments become optimizer arguments.

`AdaPreLoRASettings` holds what `TrainingArguments` has no field for (statistics, damping,
balance, ...); lr, betas, eps, weight decay and seed come from the `TrainingArguments` as they do
for AdamW. The command line gets the same settings as ``--adaprelora_*`` flags from
`AdaPreLoRAArguments`, a dataclass derived from this one, so there is one list of settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from ..optim import DEFAULT_STATS, MOMENTUM_CHOICES, OPTIMIZERS, STATS_CHOICES, optimizer_kwargs

__all__ = ["AdaPreLoRASettings", "AdaPreLoRAArguments", "optimizer_settings", "PREFIX"]

PREFIX = "adaprelora_"


@dataclass
class AdaPreLoRASettings:
    """AdaPreLoRA's settings beyond Adam's (see `AdaPreLoRA` for their evidence)."""

    beta1: float = field(default=0.0, metadata={
        "help": "momentum (0: the momentum-free rule, which keeps no momentum buffers)"})
    beta2: float = field(default=0.999, metadata={"help": "statistics' EMA decay (when beta2_decay is off)"})
    beta2_decay: float | None = field(default=None, metadata={
        "help": "statistics' decay schedule 1 - t^x, e.g. -0.8 as Adafactor (0: off, use beta2)"})
    eps: float = field(default=1e-30, metadata={"help": "added to every entry of G^2 in the statistics"})
    scale_parameter: bool = field(default=False, metadata={
        "help": "lr relative to each layer's weight RMS (Adafactor's relative step)"})
    stats: str = field(default=DEFAULT_STATS, metadata={
        "help": f"where Adafactor's row/column statistics come from: {', '.join(STATS_CHOICES)}", "choices": list(STATS_CHOICES)})
    damping: float = field(default=0.1, metadata={"help": "relative damping of the r x r solves"})
    balance: float = field(default=0.5, metadata={"help": "share c in [0, 1] of the common step given to A"})
    clip_threshold: float | None = field(default=1.0, metadata={"help": "clip the RMS of the W-step to this (<= 0: off)"})
    momentum: str = field(default=MOMENTUM_CHOICES[0], metadata={
        "help": f"where the first moment sits: {', '.join(MOMENTUM_CHOICES)}", "choices": list(MOMENTUM_CHOICES)})

    def __post_init__(self):
        if self.clip_threshold is not None and self.clip_threshold <= 0:
            self.clip_threshold = None  # the flag's "off", as in the DreamBooth trainer
        if self.beta2_decay == 0:
            self.beta2_decay = None
        if self.stats not in STATS_CHOICES:
            raise ValueError(f"adaprelora stats must be one of {', '.join(STATS_CHOICES)}, got {self.stats!r}.")
        if self.momentum not in MOMENTUM_CHOICES:
            raise ValueError(f"adaprelora momentum must be one of {', '.join(MOMENTUM_CHOICES)}, got {self.momentum!r}.")


def _prefixed(cls: type) -> type:
    """The same fields with ``adaprelora_`` in front: the flags, and the keys of `OPTIMIZER_SETTINGS`."""
    specs = [(PREFIX + f.name, f.type, field(default=f.default, metadata=f.metadata)) for f in fields(cls)]

    def settings(self) -> AdaPreLoRASettings:
        return cls(**{f.name: getattr(self, PREFIX + f.name) for f in fields(cls)})

    return dataclasses.make_dataclass("AdaPreLoRAArguments", specs, namespace={
        "settings": settings, "__doc__": "The ``--adaprelora_*`` flags: `AdaPreLoRASettings` as command-line fields."})


AdaPreLoRAArguments = _prefixed(AdaPreLoRASettings)


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
