"""The LoRA-pair optimizers under sharded training: FSDP2 shards the frozen base model and keeps every
trainable parameter whole; FSDP1 and DeepSpeed ZeRO are refused before training.

AdaPreLoRA's closed form needs each module's A and B, and their gradients, whole. FSDP2
(``fully_shard``) would split them into per-rank DTensor shards. Rather than gather them at every
step (an all-gather of every factor and gradient, and a scatter of the update), the trainable
parameters (LoRA factors, ``modules_to_save``; 0.8 GB in float32 for a Llama-70B shape at rank 16,
against 140 GB of bf16 base weights) are left out of FSDP with accelerate's ``ignored_modules``
(FSDP2's ``ignored_params``): they stay plain tensors, replicated on every rank, while the base
weights are sharded.
FSDP does not reduce the gradients of what it ignores, so `average_gradients_when_synced` does
what DDP would: after the last micro-batch of an accumulation window each gradient is averaged
over the ranks, before clipping and the step. The hook statistics are averaged by the optimizer
itself, as under DDP. transformers' Trainer does the same for an adapter attached to a model
sharded at load time (its private ``_sync_replicated_trainable_parameters``); it is not public API,
so this module keeps its own.

FSDP1 flattens parameters into per-unit flat tensors, and DeepSpeed ZeRO hands the optimizer flat
fp32 partitions of the parameters instead of the parameters themselves: neither can give a pair
optimizer whole factors, so both are refused with the supported alternatives.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["deepspeed_refusal", "fsdp1_refusal", "fsdp2_resume_refusal", "keep_trainable_whole",
           "average_gradients_when_synced"]

logger = logging.getLogger(__name__)

_SUPPORTED = ("Supported: DDP (torchrun / accelerate launch, no sharding config), or FSDP2 (fsdp_version 2), "
              "which shards the base model and keeps the LoRA factors whole")


def deepspeed_refusal(optimizer: str, source: str = "DeepSpeed") -> str:
    """Why DeepSpeed cannot train with ``optimizer`` (a pair optimizer), naming the fix."""
    return (f"{source} with --optimizer {optimizer}: DeepSpeed ZeRO gives the optimizer flat per-rank partitions of the "
            f"parameters instead of the LoRA factors, and {optimizer} steps each (A, B) pair whole. {_SUPPORTED}; "
            "or keep DeepSpeed with --optimizer adamw.")


def fsdp1_refusal(optimizer: str) -> str:
    return (f"FSDP version 1 with --optimizer {optimizer}: it flattens the LoRA factors into per-unit flat tensors, and "
            f"{optimizer} steps each (A, B) pair whole. Set fsdp_version 2 (in --fsdp_config: \"version\": 2, or "
            "fsdp_version: 2 in accelerate's config).")


def fsdp2_resume_refusal(optimizer: str) -> str:
    return (f"--resume_from_checkpoint under FSDP2 with --optimizer {optimizer} is not supported yet: accelerate's FSDP "
            "checkpoint loader waits forever for the LoRA factors kept out of FSDP (torch 2.13, accelerate 1.15). "
            "Each checkpoint-N still holds the adapter (PeftModel.from_pretrained loads it); to be able to resume, "
            "train with DDP (the same command without the FSDP config).")


def _trainable_modules(model: nn.Module) -> list[str]:
    """Names of the modules that own a trainable parameter directly (LoRA's lora_A/lora_B Linear, a
    modules_to_save copy's leaves)."""
    return [name for name, module in model.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))]


def keep_trainable_whole(fsdp_plugin, model: nn.Module) -> list[nn.Parameter]:
    """Have accelerate's FSDP2 preparation leave ``model``'s trainable parameters unsharded; returns them.

    ``ignored_modules`` is given as a pattern of module names, the form for which accelerate also
    moves those modules to the device (FSDP moves only what it shards)."""
    names = _trainable_modules(model)
    if not names:
        return []
    fsdp_plugin.ignored_modules = "|".join(re.escape(name) for name in names)
    params = [p for p in model.parameters() if p.requires_grad]
    logger.info("FSDP2: %d trainable parameters (%d values) kept whole on every rank; the rest of the model is sharded.",
                len(params), sum(p.numel() for p in params))
    return params


def average_gradients_when_synced(params: list[nn.Parameter], synced) -> None:
    """Make ``params`` equal on every rank (a broadcast from rank 0), then average each gradient over the
    ranks once ``synced()`` is true (the last micro-batch of an accumulation window), from a hook that
    runs when that gradient is complete: what DDP does for the parameters it wraps."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()

    def average(param: torch.Tensor) -> None:
        if synced() and param.grad is not None:
            dist.all_reduce(param.grad)  # a sum: gloo has no ReduceOp.AVG
            param.grad.div_(world)

    for param in params:
        with torch.no_grad():
            dist.broadcast(param.data, src=0)
        if not getattr(param, "_adaprelora_grad_average", False):  # train() may run twice on one model
            param.register_post_accumulate_grad_hook(average)
            param._adaprelora_grad_average = True
