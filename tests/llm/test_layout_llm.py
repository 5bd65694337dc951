"""The llm room's place in the layout: its imports, its optional extra, its command."""

import ast
import tomllib
from pathlib import Path

from tests.test_layout import _room_imports

ROOT = Path(__file__).resolve().parents[2]


def test_llm_imports_only_optim_engine_and_itself():
    for module, names in _room_imports("llm").items():
        rooms = {n.split(".")[1] for n in names if n.count(".") >= 1}
        assert rooms <= {"optim", "engine", "llm"}, module
        assert not any("benchmarks" in n for n in names), module


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions are lazy
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_trl_is_imported_only_where_the_optional_extra_is_needed():
    """`import adaprelora_diffusion.llm` and AdaPreLoRATrainer work without the [llm] extra (TRL)."""
    llm = ROOT / "adaprelora_diffusion" / "llm"
    with_trl = {p.name for p in llm.glob("*.py") if any(n.split(".")[0] == "trl" for n in _top_level_imports(p))}
    assert with_trl == set()  # config.py and sft_trainer.py import it in a try block that names the extra
    for name in ("config.py", "sft_trainer.py"):
        assert "pip install 'adaprelora-diffusion[llm]'" in (llm / name).read_text()
    assert not {".config", ".cli", ".sft_trainer"} & _top_level_imports(llm / "__init__.py")
    assert not {".config", ".sft_trainer"} & _top_level_imports(llm / "cli.py")


def test_the_command_and_the_extra_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["adaprelora-llm"] == "adaprelora_diffusion.llm.cli:main"
    assert {r.split(">")[0] for r in project["optional-dependencies"]["llm"]} == {"trl", "datasets"}
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    assert any(line.startswith("trl==") for line in constraints) and any(line.startswith("datasets==") for line in constraints)
