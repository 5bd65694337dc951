"""Print the installed versions of the packages the version checks care about (one per line)."""

from importlib.metadata import PackageNotFoundError, version

for name in ["torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub", "tokenizers",
             "numpy", "pillow", "tqdm", "tensorboard", "pytest", "pytorch_optimizer", "trl", "datasets", "gradio"]:
    try:
        print(f"  {name:18s} {version(name)}")
    except PackageNotFoundError:
        print(f"  {name:18s} (not installed)")
