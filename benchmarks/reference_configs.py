"""Configs of real architectures, for benchmarks that need the true shapes but no download.

The values are those of the public Stable Diffusion 1.5 UNet config (`unet/config.json` of the
1.5 checkpoint); building from them gives the real layer shapes with random weights.
"""

from __future__ import annotations

SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

#: LoRA targets of diffusers' DreamBooth LoRA script for the UNet.
UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def sd15_attention_projection_shapes(targets=UNET_ATTENTION_TARGETS) -> list[tuple[str, int, int]]:
    """(module name, in_features, out_features) of the SD 1.5 UNet's LoRA targets, from diffusers."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from torch import nn

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    return [
        (name, module.in_features, module.out_features)
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear) and any(name.endswith("." + t) for t in targets)
    ]
