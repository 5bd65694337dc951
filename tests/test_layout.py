"""The package's rooms and which way imports go (README "Layout")."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adaprelora_diffusion"


def _imports(path: Path) -> set[str]:
    """Absolute names of the package modules that ``path`` imports (relative imports resolved)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {n for n in found if n.startswith("adaprelora_diffusion")}


def _room_imports(room: str) -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE)): _imports(p) for p in (PACKAGE / room).rglob("*.py")}


def test_importing_the_optimizer_core_loads_no_diffusers_or_gradio():
    code = "import sys, adaprelora_diffusion.optim; print(sorted(m for m in ('diffusers', 'gradio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_imports_flow_one_way():
    for room, allowed in {"optim": {"optim"}, "engine": {"engine"}}.items():
        for module, names in _room_imports(room).items():
            rooms = {n.split(".")[1] for n in names if n.count(".") >= 1}
            assert rooms <= allowed, f"{module} imports {sorted(names)}"
    for module, names in _room_imports("dreambooth").items():
        rooms = {n.split(".")[1] for n in names if n.count(".") >= 1}
        assert rooms <= {"optim", "engine", "dreambooth"} | ({"demo"} if module == "dreambooth/model_loading.py" else set()), module
        assert not any("benchmarks" in n for n in names)


def test_the_demo_is_reached_only_to_pick_the_default_model():
    source = (PACKAGE / "dreambooth" / "model_loading.py").read_text()
    tree = ast.parse(source)
    users = [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
             and any(isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("demo") for n in ast.walk(f))]
    assert users == ["default_model"]
