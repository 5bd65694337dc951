"""Shared fixtures: one tiny pipeline folder per test session (built in a temp dir, never ~/.cache)."""

import os

# Never reach for the Hub from tests: everything they load is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from adaprelora_diffusion.demo.tiny_pipeline import ensure_tiny_pipeline  # noqa: E402

# The tiny models gain nothing from intra-op threads, and with another process on the 2 cores,
# OpenMP's spin-waiting slowed single tests from ~0.5 s to ~45 s; one thread avoids that.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    return ensure_tiny_pipeline(cache_dir=tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory):
    return ensure_tiny_pipeline(cache_dir=tmp_path_factory.mktemp("tiny-sdxl-cache"), family="sdxl")


@pytest.fixture(params=["sd", "sdxl"])
def family_model(request):
    """(family, model folder) for tests that must hold for SD 1.x/2.x and SDXL alike."""
    name = "tiny_pipeline_dir" if request.param == "sd" else "tiny_sdxl_pipeline_dir"
    return request.param, request.getfixturevalue(name)
