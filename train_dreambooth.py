#!/usr/bin/env python
"""DreamBooth LoRA for Stable Diffusion, optimized by AdaPreLoRA (the same as `adaprelora-dreambooth`).

    python train_dreambooth.py                       # demo: tiny pretrained model, demo subject, CPU
    python train_dreambooth.py --pretrained_model_name_or_path PATH_OR_ID \\
        --instance_data_dir photos/ --instance_prompt "a photo of sks dog" --output_dir my-lora

Flags follow diffusers' DreamBooth LoRA script; `--help` lists them all. The command line lives
in `adaprelora_diffusion.dreambooth.cli`.
"""

import sys

from adaprelora_diffusion.dreambooth.cli import main

if __name__ == "__main__":
    sys.exit(main())
