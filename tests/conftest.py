"""Shared fixtures: one tiny pipeline folder per test session (built in a temp dir, never ~/.cache)."""

import pytest

from adaprelora_diffusion.tiny_pipeline import ensure_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    return ensure_tiny_pipeline(cache_dir=tmp_path_factory.mktemp("tiny-cache"))
