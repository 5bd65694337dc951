"""A built wheel carries the demo model and subject, and the console script."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{done.stderr[-3000:]}")
    (path,) = out.glob("adaprelora_diffusion-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_ships_the_default_model_and_demo_subject(wheel):
    names = set(wheel.namelist())
    shipped = ROOT / "adaprelora_diffusion" / "demo" / "assets"
    expected = {p.relative_to(ROOT).as_posix() for p in shipped.rglob("*") if p.is_file()}
    assert expected and expected <= names, sorted(expected - names)
    assert not any(n.startswith(("benchmarks/", "tests/")) for n in names)


def test_wheel_declares_the_console_script(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "adaprelora-dreambooth = adaprelora_diffusion.dreambooth.cli:main" in text
