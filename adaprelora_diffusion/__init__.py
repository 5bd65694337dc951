"""adaprelora-diffusion: DreamBooth LoRA for Stable Diffusion, optimized by AdaPreLoRA."""

__version__ = "0.1.0"
