"""`make_optimizer`: one entry point over the LoRA optimizers the project compares.

Each name maps to the maintained implementation where one exists (torch.optim, peft.optimizers,
pytorch-optimizer's SOAP); only AdaPreLoRA and LoRA-Pro are this package's own.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .adaprelora import AdaPreLoRA
from .lorapro import LoRAPro
from .settings import keyword_table, lr_problem

__all__ = ["OPTIMIZERS", "OPTIMIZER_SETTINGS", "make_optimizer", "optimizer_kwargs"]

ModelSpec = nn.Module | Sequence[nn.Module | dict[str, Any]]


def _specs(model: ModelSpec) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Normalise a module, or a list of modules / {"model": m, **overrides}, to (module, overrides)."""
    items = [model] if isinstance(model, nn.Module) else list(model)
    out = []
    for item in items:
        if isinstance(item, nn.Module):
            out.append((item, {}))
        else:
            item = dict(item)
            out.append((item.pop("model"), item))
    return out


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters: attach LoRA adapters (or unfreeze) first.")
    return params


def _torch_style(cls: type[Optimizer]) -> Callable[..., Optimizer]:
    def build(model: ModelSpec, lr: float, **kwargs) -> Optimizer:
        groups = [{"params": _trainable(m), **ov} for m, ov in _specs(model)]
        return cls(groups, lr=lr, **kwargs)

    return build


def _adamw(model: ModelSpec, lr: float, **kwargs) -> Optimizer:
    kwargs.setdefault("foreach", None)
    return _torch_style(torch.optim.AdamW)(model, lr, **kwargs)


def _loraplus(model: ModelSpec, lr: float, loraplus_lr_ratio: float = 16.0, **kwargs) -> Optimizer:
    """peft's LoRA+ (B gets lr x ratio) with AdamW; one call per model, groups merged."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer = None
    for module, ov in _specs(model):
        ov = dict(ov)
        part = create_loraplus_optimizer(module, torch.optim.AdamW, lr=ov.pop("lr", lr), loraplus_lr_ratio=loraplus_lr_ratio, **kwargs)
        for group in part.param_groups:
            group.update(ov)
        if optimizer is None:
            optimizer = part
        else:
            for group in part.param_groups:
                optimizer.add_param_group(group)
    return optimizer


def _scaled_adamw(model: ModelSpec, lr: float, reg: float = 1e-2, **kwargs) -> Optimizer:
    """peft's Riemannian (scaled) AdamW: r x r preconditioners on the factor gradients."""
    from peft.optimizers import create_riemannian_optimizer

    specs = _specs(model)
    container = nn.ModuleList([m for m, _ in specs])
    optimizer = create_riemannian_optimizer(container, torch.optim.AdamW, lr=lr, reg=reg, **kwargs)
    # peft puts every trainable parameter in one group; restore one group per model so
    # per-model overrides (e.g. a text-encoder lr) apply. The preconditioner keeps its pairs.
    optimizer.param_groups.clear()
    for module, ov in specs:
        optimizer.add_param_group({"params": _trainable(module), **ov})
    return optimizer


def _adamw8bit(model: ModelSpec, lr: float, **kwargs) -> Optimizer:
    """bitsandbytes' 8-bit AdamW (diffusers' --use_8bit_adam): optimizer state in 8 bits, CUDA only."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("optimizer 'adamw8bit' needs bitsandbytes (CUDA GPUs): pip install bitsandbytes.")
    import bitsandbytes as bnb

    return _torch_style(bnb.optim.AdamW8bit)(model, lr, **kwargs)


def _soap(model: ModelSpec, lr: float, **kwargs) -> Optimizer:
    if importlib.util.find_spec("pytorch_optimizer") is None:
        raise ValueError("optimizer 'soap' needs the optional extra: pip install 'adaprelora-diffusion[soap]'.")
    from pytorch_optimizer import SOAP

    return _torch_style(SOAP)(model, lr, **kwargs)


OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "adaprelora": lambda model, lr, **kw: AdaPreLoRA.from_model(model, lr=lr, **kw),
    "adamw": _adamw,
    "loraplus": _loraplus,
    "scaled_adamw": _scaled_adamw,
    "adafactor": _torch_style(torch.optim.Adafactor),
    "lorapro": lambda model, lr, **kw: LoRAPro.from_model(model, lr=lr, **kw),
    "soap": _soap,
    "adamw8bit": _adamw8bit,
}


def make_optimizer(name: str, model: ModelSpec, lr: float, **kwargs) -> Optimizer:
    """Build optimizer `name` over the trainable parameters of `model` (module(s) with LoRA).

    `model` may be a list of modules or of ``{"model": m, "lr": ...}`` dicts for per-model
    settings. Extra keyword arguments go to the optimizer; unknown ones are a clear error.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}.")
    if lr_problem(lr):
        raise ValueError(lr_problem(lr))
    try:
        return OPTIMIZERS[name](model, lr, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        raise ValueError(f"optimizer {name!r} does not take these arguments: {sorted(kwargs)} ({err}).") from err


#: Which trainer settings each optimizer takes, and under which keyword. The settings are the
#: trainers' flag names (``betas`` from ``--adam_beta1/2``); one table for every trainer, so the
#: DreamBooth CLI, the web app and the LLM tool map flags to optimizers the same way. A tuple of
#: settings becomes one tuple-valued keyword (AdaPreLoRA's ``betas`` from its two flags). AdaPreLoRA's
#: own ``adaprelora_*`` settings come from their one definition, ``settings.ADAPRELORA_SETTINGS``.
_ADAM = {"betas": "betas", "weight_decay": "weight_decay", "adam_epsilon": "eps"}
OPTIMIZER_SETTINGS: dict[str, dict[str | tuple[str, ...], str]] = {
    "adaprelora": {"betas": "adamw_betas", "weight_decay": "weight_decay", "adam_epsilon": "adamw_eps", "seed": "seed",
                   **keyword_table()},
    "adamw": _ADAM,
    "loraplus": {**_ADAM, "loraplus_lr_ratio": "loraplus_lr_ratio"},
    "scaled_adamw": {**_ADAM, "scaled_adamw_reg": "reg"},
    "adafactor": {"weight_decay": "weight_decay"},  # keeps its own second-moment schedule
    "lorapro": {"betas": "betas", "weight_decay": "weight_decay", "adam_epsilon": "adamw_eps",
                "lorapro_damping": "damping"},
    "soap": _ADAM,
    "adamw8bit": _ADAM,
}


def optimizer_kwargs(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of optimizer ``name`` from a trainer's settings (see OPTIMIZER_SETTINGS).

    Settings the optimizer does not take are ignored (a flag of another optimizer); a missing
    setting keeps the optimizer's own default.
    """
    if name not in OPTIMIZER_SETTINGS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}.")
    kwargs = {}
    for key, kw in OPTIMIZER_SETTINGS[name].items():
        if isinstance(key, tuple):
            if all(k in settings for k in key):
                kwargs[kw] = tuple(settings[k] for k in key)
        elif key in settings:
            kwargs[kw] = settings[key]
    return kwargs
