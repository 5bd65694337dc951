"""Attach the LoRA adapters that a DreamBooth run trains."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from peft import LoraConfig
from torch import nn

from .config import TEXT_ENCODER_TARGETS, TrainConfig

__all__ = ["attach_lora", "add_text_encoder_lora", "trainable_parameters", "trained_params_by_name", "adapters_disabled",
           "LORA_ROLES"]

#: the modules that can carry LoRA, by their role (SDComponents' attribute names); checkpoints name
#: each trained tensor "<role>.<parameter name>"
LORA_ROLES = ("unet", "text_encoder", "text_encoder_2")


def add_text_encoder_lora(text_encoder: nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
    """Inject a LoRA adapter into a transformers text encoder with peft itself.

    This does what ``PreTrainedModel.add_adapter`` does, minus transformers' PEFT version gate:
    transformers >= 5.24 refuses peft < 0.22 there ("The version of PEFT you are using is not
    compatible"), although peft's own injection works with the peft installed. The result is the
    same model: peft LoRA layers, ``text_encoder.peft_config[adapter_name]`` (which
    ``get_peft_model_state_dict`` and the LoRA savers read) and transformers' "adapter loaded" flag,
    so gradient checkpointing and diffusers' LoRA unloading treat it as an adapter model.
    """
    from peft.functional import inject_adapter_in_model, set_adapter

    existing = getattr(text_encoder, "peft_config", None) or {}
    if adapter_name in existing:
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    # As transformers' add_adapter does (the savers drop it again: it is a local path).
    config.base_model_name_or_path = text_encoder.__dict__.get("name_or_path", None)
    inject_adapter_in_model(config, text_encoder, adapter_name)
    text_encoder._hf_peft_config_loaded = True
    set_adapter(text_encoder, adapter_name)


def _add(attach: Callable[[LoraConfig], None], config: LoraConfig, what: str) -> None:
    try:
        attach(config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(
            f"Could not attach LoRA to the {what}: {err}. Check --lora_target_modules against the model's module names."
        ) from err


def attach_lora(unet: nn.Module, text_encoders: nn.Module | list[nn.Module] | None, config: TrainConfig) -> None:
    """Add one LoRA adapter to the UNet (and to every text encoder if they are trained: SDXL has
    two); freeze the rest.

    B starts at zero (the standard init), so the model is unchanged until the first step; A
    is Gaussian, as in diffusers' DreamBooth LoRA script. The UNet gets its adapter through
    diffusers' ``add_adapter``, the text encoders through peft directly (``add_text_encoder_lora``),
    so none goes through transformers' PEFT version check.
    """
    alpha = config.lora_alpha if config.lora_alpha is not None else config.rank
    common = dict(r=config.rank, lora_alpha=alpha, lora_dropout=config.lora_dropout, init_lora_weights="gaussian",
                  use_rslora=config.use_rslora)
    unet.requires_grad_(False)
    # diffusers' PeftAdapterMixin.add_adapter checks diffusers' own minimum peft version, not transformers'.
    _add(unet.add_adapter, LoraConfig(target_modules=list(config.unet_targets()), **common), "UNet")
    if isinstance(text_encoders, nn.Module):
        text_encoders = [text_encoders]
    for i, text_encoder in enumerate(text_encoders or []):
        text_encoder.requires_grad_(False)
        if config.train_text_encoder:
            _add(lambda c, te=text_encoder: add_text_encoder_lora(te, c), LoraConfig(target_modules=list(TEXT_ENCODER_TARGETS), **common),
                 "text encoder" if i == 0 else f"text encoder {i + 1}")


def trainable_parameters(*models: nn.Module | None) -> list[torch.nn.Parameter]:
    return [p for m in models if m is not None for p in m.parameters() if p.requires_grad]


def trained_params_by_name(modules: Mapping[str, nn.Module | None]) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``{role: module}`` under the names checkpoints store them by."""
    return {f"{role}.{name}": p for role in LORA_ROLES if modules.get(role) is not None
            for name, p in modules[role].named_parameters() if p.requires_grad}


@contextlib.contextmanager
def adapters_disabled(*models: nn.Module | None) -> Iterator[None]:
    """The base models without their LoRA inside the block (class images, the app's base samples).

    Switched through peft's own layers, so it works whichever library attached the adapter
    (diffusers for the UNet, peft for the text encoders)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [layer for m in models if m is not None for layer in m.modules() if isinstance(layer, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
