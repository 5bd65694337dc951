"""Packaging: pyproject's dependency bounds, constraints.txt and the version-check scripts agree, and a
built wheel carries the demo model and subject and the console script."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def direct_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_every_direct_dependency_has_a_floor():
    # scripts/check_floors.sh tests exactly these floors; a dependency without one is untested.
    missing = [str(r) for r in direct_requirements() if not any(s.operator == ">=" for s in r.specifier)]
    assert not missing


def test_constraints_txt_satisfies_pyproject():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    for req in direct_requirements():
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(version, prereleases=True), f"constraints.txt {req.name}=={version} is outside {req}"


@pytest.mark.parametrize("script", ["check_latest.sh", "check_floors.sh"])
def test_check_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)


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
