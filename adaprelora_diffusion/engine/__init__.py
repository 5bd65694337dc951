"""The shared training room: what every trainer here needs, whatever it trains.

Atomic file writes, checkpoints with exact resume, keyed randomness, the non-finite guard,
progress events, accelerate set-up, the model-folder descriptor format and a free-port helper.
It imports torch, accelerate and safetensors, never diffusers (transformers only to silence its
torchvision notice, ``quiet_imports``), so the DreamBooth trainer, the LLM tool and the demo
models share it.
"""
