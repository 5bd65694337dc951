"""The shared training room: what every trainer here needs, whatever it trains.

Atomic file writes, checkpoints with exact resume, keyed randomness, the non-finite guard,
progress events and accelerate set-up. It imports torch, accelerate and safetensors, never
diffusers or transformers, so the DreamBooth trainer and the LLM tool share it.
"""
