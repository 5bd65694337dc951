"""docs/app.md documents exactly the endpoints the app serves; the wheel ships the app and its command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_documented_endpoints_are_the_served_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from app.service import JobService
    from app.ui import build_ui
    from app.uploads import UploadLimits
    from app.workspace import Workspace

    ws = Workspace.open(tmp_path / "ws")
    demo = build_ui(JobService(ws, [ws.models_dir], UploadLimits()))
    served = {d["api_name"] for d in demo.config["dependencies"] if d.get("api_visibility", "public") == "public"}
    table = (ROOT / "docs" / "app.md").read_text().split("| endpoint | arguments | returns |")[1].split("\n\n")[0]
    documented = set(re.findall(r"`/(\w+)`", table))
    assert served == documented == {"create_job", "job_status", "list_jobs", "stop_job", "resume_job", "delete_job",
                                    "sample", "download"}


def test_the_package_ships_the_app_and_the_adaprelora_app_command():
    """What setuptools will put in the wheel (tests/test_packaging.py builds one for the package's own data)."""
    import tomllib

    from setuptools import find_packages

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "app" in find_packages(str(ROOT), include=include)
    assert project["project"]["scripts"]["adaprelora-app"] == "app.cli:main"
    app_extra = project["project"]["optional-dependencies"]["app"]
    assert any(r.startswith("gradio>=6.29") for r in app_extra)
    declared = {_name(r) for r in app_extra + project["project"]["dependencies"]}
    missing = {m for m in _third_party_imports(ROOT / "app") if _DISTRIBUTION.get(m, m).lower() not in declared}
    assert not missing, f"app/ imports {sorted(missing)}, which pyproject.toml does not declare"


_DISTRIBUTION = {"PIL": "pillow", "gradio_client": "gradio"}  # module -> the distribution that provides it


def _name(requirement: str) -> str:
    return re.split(r"[<>=!\[; ]", requirement, maxsplit=1)[0].lower()


def _third_party_imports(folder: Path) -> set[str]:
    import ast
    import sys

    found = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in ("app", "adaprelora_diffusion")}
