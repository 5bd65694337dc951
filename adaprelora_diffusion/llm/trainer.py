"""AdaPreLoRA inside transformers' `Trainer` (and TRL's `SFTTrainer`, through the same mixin).

The Trainer keeps doing what it does with AdamW (scheduler, checkpoints with ``optimizer.pt``,
resume, logging, gradient accumulation, clipping, mixed precision, DDP); the mixin only builds
the optimizer with `make_optimizer` and handles what a LoRA-pair optimizer needs on top:

* Trainer clears gradients with ``model.zero_grad()``, never ``optimizer.zero_grad()``. That leaves
  the statistics the hooks gathered in place when a GradScaler skips a step (fp16 overflow: the
  next step would read the skipped step's inf statistics and be skipped as well), and it unhooks
  the factors' ``.grad`` from the stacked buffers the batched step reads (still correct, one copy
  per step). The mixin calls the optimizer's own ``zero_grad`` after every step, applied or not.
* FSDP2 would shard the LoRA factors, which a LoRA-pair optimizer steps whole: the trainable
  parameters are kept out of FSDP and averaged over ranks like DDP (sharding.py); FSDP1 and
  DeepSpeed ZeRO are refused with an error that says what is supported.

And what the engine gives every trainer here: a clean stop when ``should_stop()`` turns true
(the step finishes, a checkpoint is written, ``train()`` returns with ``stopped_early``), and the
divergence check (engine/divergence.py), which raises `DivergenceError` naming the lr.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Trainer, TrainerCallback

from ..engine.divergence import DivergenceCheck
from ..optim import OPTIMIZERS, make_optimizer
from ..optim.base import LoraPairOptimizer
from .settings import AdaPreLoRASettings, optimizer_settings
from .sharding import (average_gradients_when_synced, deepspeed_refusal, fsdp1_refusal, fsdp2_resume_refusal,
                       keep_trainable_whole)

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


class _StopWhenAsked(TrainerCallback):
    """After each optimizer step: if ``should_stop()`` (on any rank), save a checkpoint and end training."""

    def __init__(self, trainer, should_stop: Callable[[], bool]):
        self.trainer, self.should_stop = trainer, should_stop

    def on_step_end(self, args, state, control, **kwargs):
        asked = bool(self.should_stop())
        accelerator = self.trainer.accelerator
        if accelerator.num_processes > 1:  # every rank stops at the same step
            flag = torch.tensor([float(asked)], device=accelerator.device)
            asked = bool(accelerator.reduce(flag, "max").item())
        if asked and state.global_step < state.max_steps:
            self.trainer.stopped_early = True
            control.should_save = True
            control.should_training_stop = True
        return control


#: optimizers that step each (A, B) pair jointly and so need each factor and gradient whole
PAIR_OPTIMIZERS = ("adaprelora", "lorapro")


class AdaPreLoRAMixin:
    """Mix into a `transformers.Trainer` subclass: the optimizer is `make_optimizer(optimizer_name, model, ...)`
    with lr, betas, eps, weight decay and seed from ``args`` and AdaPreLoRA's settings from ``adaprelora``.

    ``optimizer_name`` is any `make_optimizer` name (default ``"adaprelora"``), so one trainer compares
    them all. An optimizer passed as ``optimizers=(opt, None)`` is used as it is.
    """

    def __init__(self, *args, optimizer_name: str = "adaprelora", adaprelora: AdaPreLoRASettings | None = None,
                 should_stop: Callable[[], bool] | None = None, check_divergence: bool = True, **kwargs):
        if optimizer_name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer_name {optimizer_name!r}; choose one of: {', '.join(OPTIMIZERS)}.")
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(f"{type(self).__name__} builds its optimizer from optimizer_name and adaprelora; "
                             "to pass optimizer_cls_and_kwargs, use transformers' Trainer (or TRL's SFTTrainer) itself.")
        self.optimizer_name = optimizer_name
        self.adaprelora = adaprelora if adaprelora is not None else AdaPreLoRASettings()
        self.stopped_early = False
        self._replicated: list[torch.nn.Parameter] = []  # trainable parameters FSDP2 leaves whole (sharding.py)
        self._kept_whole = False
        super().__init__(*args, **kwargs)
        self._check_supported()
        self.add_callback(_OptimizerZeroGrad())
        if should_stop is not None:
            self.add_callback(_StopWhenAsked(self, should_stop))
        self.divergence = DivergenceCheck(lr=self.args.learning_rate) if check_divergence else None
        self._checked_step = -1

    def _check_supported(self) -> None:
        pair = (isinstance(self.optimizer, LoraPairOptimizer)
                or (self.optimizer is None and self.optimizer_name in PAIR_OPTIMIZERS))
        if pair and self.is_deepspeed_enabled:
            raise ValueError(deepspeed_refusal(self.optimizer_name))
        if pair and self.is_fsdp_enabled:
            plugin = self.accelerator.state.fsdp_plugin
            if getattr(plugin, "fsdp_version", 1) != 2:
                raise ValueError(fsdp1_refusal(self.optimizer_name))
            self._replicated = keep_trainable_whole(plugin, self.model)
            self._kept_whole = True
        default_optim = type(self.args).__dataclass_fields__["optim"].default
        if self.optimizer is None and self.args.optim != default_optim:
            raise ValueError(
                f"{type(self).__name__} builds its optimizer from optimizer_name={self.optimizer_name!r}, so "
                f"args.optim={getattr(self.args.optim, 'value', self.args.optim)!r} would be ignored: leave optim at its default and choose the "
                "optimizer with optimizer_name (on the command line: --optimizer)."
            )

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self._kept_whole and resume_from_checkpoint:
            raise ValueError(fsdp2_resume_refusal(self.optimizer_name))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        if self._replicated:  # FSDP2 is prepared by now: make the whole parameters DDP-like, once
            average_gradients_when_synced(self._replicated, lambda: self.accelerator.sync_gradients)
            self._replicated = []
        step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
        if self.divergence is not None and self._checked_step != step and self.divergence.due(step):
            self._checked_step = step  # the step's first micro-batch
            self._check_divergence(model, inputs, step)
        return super().training_step(model, inputs, *args, **kwargs)

    def _check_divergence(self, model, inputs, step: int) -> None:
        """The divergence check (engine/divergence.py): this micro-batch's loss with the adapter and with it
        switched off, in eval mode, without gradients or a change to the random streams; averaged over ranks."""
        inner = self.accelerator.unwrap_model(model)
        if not hasattr(inner, "disable_adapter"):
            return  # not a peft model: no base to compare against
        inputs = self._prepare_inputs(inputs)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        was_training = inner.training
        inner.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices), self.compute_loss_context_manager():
                trained = inner(**inputs).loss.detach().float()
                with inner.disable_adapter():
                    base = inner(**inputs).loss.detach().float()
        finally:
            inner.train(was_training)
        pair = self.accelerator.reduce(torch.stack([trained, base]), "mean")
        trained_loss, base_loss = pair.tolist()
        if self.divergence.record(step, trained_loss, base_loss):
            out = self.args.output_dir if self.is_world_process_zero() else None
            raise self.divergence.error(out, resume_with_new_lr=False)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(self.args, self.optimizer_name, self.adaprelora)
        return super().create_optimizer(model)


class AdaPreLoRATrainer(AdaPreLoRAMixin, Trainer):
    """`transformers.Trainer` with AdaPreLoRA (or any `make_optimizer` name) built from its arguments.

    >>> trainer = AdaPreLoRATrainer(model=peft_model, args=TrainingArguments(...), train_dataset=ds,
    ...                             adaprelora=AdaPreLoRASettings(stats="sketch"))
    """
