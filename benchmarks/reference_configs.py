"""Configs of real architectures, for benchmarks that need the true shapes but no download.

The values are those of the public Stable Diffusion 1.5 and SDXL 1.0 base configs (`unet/config.json`,
`text_encoder*/config.json`); building from them gives the real layer shapes with random weights.
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

SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
#: CLIP ViT-L/14's text tower (SD 1.5's and SDXL's first text encoder) and OpenCLIP ViT-bigG/14's (SDXL's second).
CLIP_L_TEXT_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG_TEXT_CONFIG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                             max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

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
