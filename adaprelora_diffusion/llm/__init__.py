"""LLM fine-tuning with AdaPreLoRA in transformers, peft and TRL (to be built: issue 11).

It will build on :mod:`adaprelora_diffusion.optim` and :mod:`adaprelora_diffusion.engine`, never on
the diffusion trainer.
"""
