"""What the trainer tests share: a quick run's config, and the no-model default pointed at the test pipeline."""

import pytest

from adaprelora_diffusion.demo import pretrained_tiny
from adaprelora_diffusion.dreambooth.config import TrainConfig


def config(tmp_path, **overrides) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", num_validation_images=0, max_train_steps=4,
                checkpointing_steps=None)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture
def tiny_default(tiny_pipeline_dir, monkeypatch):
    """The no-model default resolves to the session's random tiny pipeline (fast; the numbers
    in the tests were set on it), never ~/.cache."""
    monkeypatch.setenv("ADAPRELORA_CACHE", str(tiny_pipeline_dir.parent))
    monkeypatch.setattr(pretrained_tiny, "default_pretrained_pipeline", lambda cache_dir=None: tiny_pipeline_dir)
