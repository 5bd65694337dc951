"""The shipped demo subject: present, small, and in sync with its generator script."""

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _generator():
    spec = importlib.util.spec_from_file_location("make_demo_subject", ASSETS / "make_demo_subject.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_subject_images_are_small_rgb_pngs():
    files = sorted((ASSETS / "demo_subject").glob("*.png"))
    assert len(files) == 5
    assert sum(f.stat().st_size for f in files) < 200 * 1024
    for f in files:
        with Image.open(f) as im:
            assert im.mode == "RGB" and im.size == (128, 128), f.name


def test_committed_images_match_the_generator(tmp_path):
    gen = _generator()
    gen.main(["--out", str(tmp_path)])
    for scene in gen.SCENES:
        committed = np.asarray(Image.open(ASSETS / "demo_subject" / f"{scene['name']}.png"), dtype=np.float32)
        fresh = np.asarray(Image.open(tmp_path / f"{scene['name']}.png"), dtype=np.float32)
        # Small tolerance: resampling may differ by a level across Pillow versions.
        assert np.abs(committed - fresh).mean() < 1.0, scene["name"]
