"""Configs of real architectures, for benchmarks that need the true shapes but no download.

The values are those of the public Stable Diffusion 1.5 and SDXL 1.0 base configs (`unet/config.json`,
`vae/config.json`, `text_encoder*/config.json`) and of Llama 3.2 1B (`config.json`); building from
them gives the real layer shapes with random weights.
"""

from __future__ import annotations

from pathlib import Path

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
CLIP_L_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                             max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

#: The kl-f8 VAE of SD 1.5 and SDXL 1.0 (the same layers); per family: (sample_size, scaling_factor).
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     layers_per_block=2, norm_num_groups=32)
VAE_FAMILY_CONFIG = {"sd15": dict(sample_size=512, scaling_factor=0.18215), "sdxl": dict(sample_size=1024, scaling_factor=0.13025)}

#: Llama 3.2 1B (1.24B parameters with its tied embeddings). Its llama3 rotary scaling and rope_theta
#: are left out: they set the rotary frequencies, not the cost of a step.
LLAMA_1B_CONFIG = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, hidden_act="silu",
                       rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=131072)

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


def llama_block_projection_shapes(hidden: int = 4096, mlp: int = 11008) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of one Llama block's seven projections (default: Llama 7B's widths)."""
    return [("q_proj", hidden, hidden), ("k_proj", hidden, hidden), ("v_proj", hidden, hidden), ("o_proj", hidden, hidden),
            ("gate_proj", hidden, mlp), ("up_proj", hidden, mlp), ("down_proj", mlp, hidden)]


def build_reference_pipeline(folder: Path, family: str, *, device: str = "cpu", save_dtype=None,
                             sizes: dict[str, dict] | None = None) -> Path:
    """The SD 1.5 or SDXL 1.0 architecture with random weights, saved once as a diffusers pipeline folder.

    Nothing is downloaded: UNet, VAE and CLIP text encoders are built from the configs above. The
    tokenizer is the project's small byte-level one, which changes nothing about the cost of a
    step. ``device`` is where the random weights are drawn (a GPU draws SDXL's 3.5B in a moment
    where a CPU takes minutes); ``save_dtype`` (e.g. torch.bfloat16) halves what is written and
    read back. ``sizes`` overrides config values per part ("unet", "vae", "text_encoder",
    "text_encoder_2") to build the same code path at tiny widths. An existing folder is reused.
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from adaprelora_diffusion.demo.tiny_pipeline import SD1_SCHEDULER_CONFIG, write_tokenizer_files
    from adaprelora_diffusion.dreambooth.model_loading import stable_diffusion_pipeline_class
    from adaprelora_diffusion.engine.atomic import staged_dir

    if family not in VAE_FAMILY_CONFIG:
        raise ValueError(f"family must be one of {sorted(VAE_FAMILY_CONFIG)}, got {family!r}")
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    sizes = sizes or {}
    sdxl = family == "sdxl"
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer_files(scratch)), model_max_length=77)
    texts = {"text_encoder": CLIP_L_TEXT_CONFIG, "text_encoder_2": CLIP_BIGG_TEXT_CONFIG}

    def text_config(part):  # CLIP's own vocabulary size (its embedding's memory), of which our tokenizer uses the first ids
        settings = {**texts[part], **sizes.get(part, {})}
        settings["vocab_size"] = max(settings["vocab_size"], len(tokenizer))
        return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **settings)

    torch.manual_seed(0)
    with torch.device(device):
        parts = dict(
            unet=UNet2DConditionModel(**{**(SDXL_UNET_CONFIG if sdxl else SD15_UNET_CONFIG), **sizes.get("unet", {})}),
            vae=AutoencoderKL(**{**SD_VAE_CONFIG, **VAE_FAMILY_CONFIG[family], **sizes.get("vae", {})}),
            text_encoder=CLIPTextModel(text_config("text_encoder")),
        )
        if sdxl:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(text_config("text_encoder_2"))
    for module in parts.values():
        module.to("cpu", dtype=save_dtype)
    scheduler = DDIMScheduler(**SD1_SCHEDULER_CONFIG)  # SD 1.5's and SDXL's noise schedule; training reads it as DDPM
    if sdxl:
        pipe = stable_diffusion_pipeline_class(sdxl=True)(tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler, **parts)
    else:
        pipe = stable_diffusion_pipeline_class()(tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False, **parts)
    with staged_dir(folder) as tmp:
        pipe.save_pretrained(tmp)
    return folder
