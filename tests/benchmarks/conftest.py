"""Fixtures shared by the benchmark tests."""

import pytest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Pretrained quality-task weights (T2, T5) go to a temp cache, never ~/.cache."""
    monkeypatch.setenv("ADAPRELORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
