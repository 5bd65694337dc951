"""AdaPreLoRA inside transformers' `Trainer` (and TRL's `SFTTrainer`, through the same mixin).

The Trainer keeps doing what it does with AdamW (scheduler, checkpoints with ``optimizer.pt``,
resume, logging, gradient accumulation, clipping, mixed precision, DDP); the mixin only builds
the optimizer with `make_optimizer` and handles what a LoRA-pair optimizer needs on top:

* Trainer clears gradients with ``model.zero_grad()``, never ``optimizer.zero_grad()``. That leaves
  the statistics the hooks gathered in place when a GradScaler skips a step (fp16 overflow: the
  next step would read the skipped step's inf statistics and be skipped as well), and it unhooks
  the factors' ``.grad`` from the stacked buffers the batched step reads (still correct, one copy
  per step). The mixin calls the optimizer's own ``zero_grad`` after every step, applied or not.
* DeepSpeed ZeRO and FSDP shard parameters and gradients; a LoRA-pair optimizer needs each
  factor and its gradient whole. They are refused with an error that says what is supported.
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from ..optim import OPTIMIZERS, make_optimizer
from ..optim.base import LoraPairOptimizer
from .settings import AdaPreLoRASettings, optimizer_settings

__all__ = ["AdaPreLoRAMixin", "AdaPreLoRATrainer", "MakeOptimizer", "optimizer_cls_and_kwargs"]


class MakeOptimizer:
    """An optimizer factory in transformers' sense: `Trainer(optimizer_cls_and_kwargs=(MakeOptimizer, kw))`
    calls ``MakeOptimizer()(model, **kw)``, which is `make_optimizer(kw["name"], model, ...)`."""

    def __call__(self, model, name: str = "adaprelora", **kwargs):
        return make_optimizer(name, model, **kwargs)


def optimizer_cls_and_kwargs(args, optimizer: str = "adaprelora", adaprelora: AdaPreLoRASettings | None = None):
    """``(MakeOptimizer, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: lr, betas, eps, weight decay
    and seed from ``args`` (a `TrainingArguments`), AdaPreLoRA's own settings from ``adaprelora``."""
    return MakeOptimizer, {"name": optimizer, **optimizer_settings(args, optimizer, adaprelora)}


def unwrap_optimizer(optimizer):
    """The optimizer inside accelerate's `AcceleratedOptimizer` (or the optimizer itself)."""
    while optimizer is not None and not isinstance(optimizer, LoraPairOptimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class _OptimizerZeroGrad(TrainerCallback):
    """Calls a LoRA-pair optimizer's own ``zero_grad`` where Trainer calls ``model.zero_grad()``
    (see the module docstring for why)."""

    @staticmethod
    def _zero(optimizer) -> None:
        optimizer = unwrap_optimizer(optimizer)
        if isinstance(optimizer, LoraPairOptimizer):
            optimizer.zero_grad(set_to_none=True)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._zero(optimizer)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._zero(optimizer)


#: optimizers that step each (A, B) pair jointly and so need each factor and gradient whole
PAIR_OPTIMIZERS = ("adaprelora", "lorapro")


class AdaPreLoRAMixin:
    """Mix into a `transformers.Trainer` subclass: the optimizer is `make_optimizer(optimizer_name, model, ...)`
    with lr, betas, eps, weight decay and seed from ``args`` and AdaPreLoRA's settings from ``adaprelora``.

    ``optimizer_name`` is any `make_optimizer` name (default ``"adaprelora"``), so one trainer compares
    them all. An optimizer passed as ``optimizers=(opt, None)`` is used as it is.
    """

    def __init__(self, *args, optimizer_name: str = "adaprelora", adaprelora: AdaPreLoRASettings | None = None, **kwargs):
        if optimizer_name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer_name {optimizer_name!r}; choose one of: {', '.join(OPTIMIZERS)}.")
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(f"{type(self).__name__} builds its optimizer from optimizer_name and adaprelora; "
                             "to pass optimizer_cls_and_kwargs, use transformers' Trainer (or TRL's SFTTrainer) itself.")
        self.optimizer_name = optimizer_name
        self.adaprelora = adaprelora if adaprelora is not None else AdaPreLoRASettings()
        super().__init__(*args, **kwargs)
        self._check_supported()
        self.add_callback(_OptimizerZeroGrad())

    def _check_supported(self) -> None:
        pair = (isinstance(self.optimizer, LoraPairOptimizer)
                or (self.optimizer is None and self.optimizer_name in PAIR_OPTIMIZERS))
        sharded = [name for name, on in (("DeepSpeed", self.is_deepspeed_enabled), ("FSDP", self.is_fsdp_enabled)) if on]
        if pair and sharded:
            raise ValueError(
                f"{sharded[0]} is not supported with optimizer {self.optimizer_name!r}: it shards the LoRA factors and "
                "their gradients, and this optimizer steps each (A, B) pair whole. Supported: one device, or data "
                "parallelism (DDP: torchrun / accelerate launch without a DeepSpeed or FSDP config). To shard, use "
                "another optimizer (optimizer_name='adamw') or train with transformers' Trainer and its own optimizer."
            )
        default_optim = type(self.args).__dataclass_fields__["optim"].default
        if self.optimizer is None and self.args.optim != default_optim:
            raise ValueError(
                f"{type(self).__name__} builds its optimizer from optimizer_name={self.optimizer_name!r}, so "
                f"args.optim={getattr(self.args.optim, 'value', self.args.optim)!r} would be ignored: leave optim at its default and choose the "
                "optimizer with optimizer_name (on the command line: --optimizer)."
            )

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(self.args, self.optimizer_name, self.adaprelora)
        return super().create_optimizer(model)


class AdaPreLoRATrainer(AdaPreLoRAMixin, Trainer):
    """`transformers.Trainer` with AdaPreLoRA (or any `make_optimizer` name) built from its arguments.

    >>> trainer = AdaPreLoRATrainer(model=peft_model, args=TrainingArguments(...), train_dataset=ds,
    ...                             adaprelora=AdaPreLoRASettings(stats="sketch"))
    """
