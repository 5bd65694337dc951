"""pyproject.toml's dependency bounds, constraints.txt and the version-check scripts agree."""

import subprocess
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
