"""Attach the LoRA adapters that a DreamBooth run trains."""

from __future__ import annotations

import torch
from peft import LoraConfig
from torch import nn

from .config import TEXT_ENCODER_TARGETS, TrainConfig

__all__ = ["attach_lora", "trainable_parameters"]


def _add(model: nn.Module, config: LoraConfig, what: str) -> None:
    try:
        model.add_adapter(config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(
            f"Could not attach LoRA to the {what}: {err}. Check --lora_target_modules against the model's module names."
        ) from err


def attach_lora(unet: nn.Module, text_encoder: nn.Module | None, config: TrainConfig) -> None:
    """Add one LoRA adapter to the UNet (and the text encoder if trained); freeze the rest.

    B starts at zero (the standard init), so the model is unchanged until the first step; A
    is Gaussian, as in diffusers' DreamBooth LoRA script.
    """
    alpha = config.lora_alpha if config.lora_alpha is not None else config.rank
    common = dict(r=config.rank, lora_alpha=alpha, lora_dropout=config.lora_dropout, init_lora_weights="gaussian",
                  use_rslora=config.use_rslora)
    unet.requires_grad_(False)
    _add(unet, LoraConfig(target_modules=list(config.unet_targets()), **common), "UNet")
    if text_encoder is not None:
        text_encoder.requires_grad_(False)
        if config.train_text_encoder:
            _add(text_encoder, LoraConfig(target_modules=list(TEXT_ENCODER_TARGETS), **common), "text encoder")


def trainable_parameters(*models: nn.Module | None) -> list[torch.nn.Parameter]:
    return [p for m in models if m is not None for p in m.parameters() if p.requires_grad]
