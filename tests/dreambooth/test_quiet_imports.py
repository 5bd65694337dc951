"""A first run must not print transformers' "ImageProcessor requires torchvision" fallback notices.

They come from importing diffusers' StableDiffusionPipeline (its module imports CLIPImageProcessor,
its IP-Adapter mixin SiglipImageProcessor) without torchvision. Python imports a module once per
process, so each entry point is checked in a fresh interpreter.
"""

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adaprelora_diffusion.engine.quiet_imports import no_image_processor_fallback_notice

REPO = Path(__file__).resolve().parents[2]
NOTICE = "requires torchvision (not installed); falling back to"


def run_fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    prelude = "import torch; torch.set_num_threads(1)\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=str(REPO), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def notice_expected():
    """The plain diffusers import prints the notices here; otherwise (torchvision installed) there is nothing to test."""
    proc = run_fresh("from diffusers import StableDiffusionPipeline")
    if NOTICE not in proc.stderr:
        pytest.skip("this environment prints no torchvision fallback notice (torchvision installed?)")
    assert "`CLIPImageProcessor` requires torchvision" in proc.stderr


def test_loading_and_validation_images_print_no_notice(notice_expected, tiny_pipeline_dir):
    proc = run_fresh(f"""
        from adaprelora_diffusion.dreambooth.model_loading import load_pipeline_components
        from adaprelora_diffusion.dreambooth.validation import generate_images
        c = load_pipeline_components({str(tiny_pipeline_dir)!r})
        images = generate_images(unet=c.unet, text_encoder=c.text_encoder, vae=c.vae, tokenizer=c.tokenizer,
                                 scheduler_config=c.noise_scheduler.config, prompt="a photo", num_images=1, seed=0,
                                 resolution=64, num_inference_steps=1)
        assert len(images) == 1
    """)
    assert NOTICE not in proc.stderr, proc.stderr


def test_saving_a_lora_prints_no_notice(notice_expected, tiny_pipeline_dir, tmp_path):
    proc = run_fresh(f"""
        from diffusers import UNet2DConditionModel
        from peft import LoraConfig
        from adaprelora_diffusion.dreambooth.lora_files import save_lora_weights
        unet = UNet2DConditionModel.from_pretrained({str(tiny_pipeline_dir)!r}, subfolder="unet")
        unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
        save_lora_weights({str(tmp_path)!r}, unet)
    """)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    assert NOTICE not in proc.stderr, proc.stderr


def test_class_image_pipeline_prints_no_notice(notice_expected, tiny_pipeline_dir, tmp_path):
    # The trainer's factory imports StableDiffusionPipeline itself, as this one does.
    proc = run_fresh(f"""
        from adaprelora_diffusion.dreambooth.prior import ensure_class_images

        def factory():
            from diffusers import StableDiffusionPipeline
            return StableDiffusionPipeline.from_pretrained({str(tiny_pipeline_dir)!r}, safety_checker=None)

        ensure_class_images({str(tmp_path)!r}, "a photo of a robot", 1, pipeline_factory=factory, resolution=64,
                            num_inference_steps=1)
    """)
    assert len(list(tmp_path.glob("class-*.png"))) == 1
    assert NOTICE not in proc.stderr, proc.stderr


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_only_that_notice_and_only_inside_the_block_is_dropped():
    notice = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for "
              "backward compatibility. Install torchvision to use the default backend, or import "
              "`CLIPImageProcessorPil` directly to silence this warning.")
    logger = logging.getLogger("transformers.utils.import_utils")
    handler = Collect()
    logger.addHandler(handler)
    try:
        with no_image_processor_fallback_notice():
            logger.warning(notice)
            logger.warning("Could not import module 'X'.")
        logger.warning(notice)
        logging.getLogger("transformers.other").warning(notice)  # another logger: untouched (and not collected)
    finally:
        logger.removeHandler(handler)
    assert handler.messages == ["Could not import module 'X'.", notice]
    assert not logger.filters


def test_building_the_tiny_pipelines_and_importing_diffusers_afterwards_print_no_notice(notice_expected, tmp_path):
    """The demo's pipeline builders (every test session builds them) and any later plain diffusers import."""
    proc = run_fresh(f"""
        from adaprelora_diffusion.demo.tiny_pipeline import ensure_tiny_pipeline
        ensure_tiny_pipeline(cache_dir={str(tmp_path)!r})
        ensure_tiny_pipeline(cache_dir={str(tmp_path)!r}, family="sdxl")
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    """)
    assert NOTICE not in proc.stderr, proc.stderr
